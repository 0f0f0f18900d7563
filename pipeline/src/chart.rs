//! Loss curves drawn to a PNG (a line per step, its moving average on top, axes with the step
//! and loss ranges written in a 5×7 digit font), with no plotting dependency.

use anyhow::Result;

const W: usize = 720;
const H: usize = 400;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 20;
const BOTTOM: usize = 40;

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Digits, '.', '-' and 'e' at (x, y), 2× scaled.
    fn text(&mut self, x: i64, y: i64, s: &str) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(
                                x + k as i64 * 12 + col * 2 + ox,
                                y + r as i64 * 2 + oy,
                                [0, 0, 0],
                            );
                        }
                    }
                }
            }
        }
    }
}

fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        _ => [0; 7],
    }
}

/// A PNG of `(step, loss, learning rate)` points: the loss per step in light blue, its
/// 10-step moving average in dark blue, the first and last step under the x axis and the
/// loss range beside the y axis.
pub fn loss_png(curve: &[(usize, f64, f64)]) -> Result<Vec<u8>> {
    let mut c = Canvas::new();
    let (x0, x1) = (LEFT as i64, (W - RIGHT) as i64);
    let (y0, y1) = (TOP as i64, (H - BOTTOM) as i64);
    c.line((x0, y1), (x1, y1), [0, 0, 0]);
    c.line((x0, y0), (x0, y1), [0, 0, 0]);
    let finite: Vec<&(usize, f64, f64)> = curve.iter().filter(|p| p.1.is_finite()).collect();
    if let (Some(first), Some(last)) = (finite.first(), finite.last()) {
        let lo = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let span = (hi - lo).max(1e-9);
        let steps = (last.0 - first.0).max(1) as f64;
        let at = |step: usize, loss: f64| {
            (
                x0 + ((step - first.0) as f64 / steps * (x1 - x0) as f64).round() as i64,
                y1 - ((loss - lo) / span * (y1 - y0) as f64).round() as i64,
            )
        };
        for k in 1..4 {
            let y = y1 - (y1 - y0) * k / 4;
            for x in (x0..x1).step_by(4) {
                c.set(x, y, [210, 210, 210]);
            }
        }
        for w in finite.windows(2) {
            c.line(at(w[0].0, w[0].1), at(w[1].0, w[1].1), [160, 190, 230]);
        }
        let avg: Vec<(usize, f64)> = (0..finite.len())
            .map(|i| {
                let from = i.saturating_sub(9);
                let s = &finite[from..=i];
                (
                    finite[i].0,
                    s.iter().map(|p| p.1).sum::<f64>() / s.len() as f64,
                )
            })
            .collect();
        for w in avg.windows(2) {
            c.line(at(w[0].0, w[0].1), at(w[1].0, w[1].1), [20, 60, 160]);
        }
        c.text(2, y0, &format!("{hi:.3}"));
        c.text(2, y1 - 14, &format!("{lo:.3}"));
        c.text(x0, y1 + 10, &first.0.to_string());
        let end = last.0.to_string();
        c.text(x1 - 12 * end.len() as i64, y1 + 10, &end);
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(&c.px)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_is_a_png_with_the_line_drawn() {
        let curve: Vec<(usize, f64, f64)> = (0..50)
            .map(|s| (s, 4.0 / (1.0 + s as f64 * 0.1), 1e-3))
            .collect();
        let bytes = loss_png(&curve).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        // The first point (highest loss) is at the top left of the plot, the last at the right.
        let px = |x: usize, y: usize| &buf[(y * W + x) * 3..(y * W + x) * 3 + 3];
        let dark = |x: usize| (TOP..H - BOTTOM).any(|y| px(x, y) == [20, 60, 160]);
        assert!(dark(LEFT + 1) && dark(W - RIGHT - 1));
        assert!(loss_png(&[]).is_ok());
    }
}
