//! `${VAR}` and `${VAR:-default}` in job files; `$$` is a literal `$`.

/// Expands variables in `s` with `lookup`. On error, says which variable and how to fix it.
pub fn interpolate(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || name.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(format!("`${{{expr}}}` is not a variable reference"));
            }
            match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set; export it or write ${{{name}:-default}}"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("x".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands() {
        assert_eq!(interpolate("plain", &env).unwrap(), "plain");
        assert_eq!(interpolate("${A}", &env).unwrap(), "x");
        assert_eq!(interpolate("a-${A}-b", &env).unwrap(), "a-x-b");
        assert_eq!(interpolate("${B:-def}", &env).unwrap(), "def");
        assert_eq!(interpolate("${EMPTY:-def}", &env).unwrap(), "def");
        assert_eq!(interpolate("${A:-def}.dlq", &env).unwrap(), "x.dlq");
        assert_eq!(interpolate("$$A $5", &env).unwrap(), "$A $5");
        assert!(interpolate("${B}", &env)
            .unwrap_err()
            .contains("B is not set"));
        assert!(interpolate("${A", &env).is_err());
        assert!(interpolate("${a b}", &env).is_err());
    }
}
