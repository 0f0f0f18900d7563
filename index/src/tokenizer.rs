//! Byte-level BPE tokenizers trained on a Datanet (the `tokenizers` crate; nothing downloaded).
//!
//! GPT-2's scheme: every byte is a symbol (so any text encodes, no unknown token), words are
//! split by GPT-2's pre-tokenising pattern without a prefix space, merges are learnt from the
//! Datanet's own texts. Id 0 is the special token `<|endoftext|>` (the `eos` that document
//! ends read as in next-token results); the vocabulary stops below 65,535 because u16 token
//! 65,535 is the document separator of the index.

use std::path::Path;
use std::str::FromStr;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder, TokenizerImpl,
};

use crate::{IndexError, Result, DOC_SEP};

/// The special token at id 0.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// A trained tokenizer whose ids fit the index's u16 tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
}

fn err(e: impl std::fmt::Display) -> IndexError {
    IndexError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Learns a vocabulary of at most `vocab_size` tokens (256 bytes, `<|endoftext|>` and the
    /// merges; at most 65,535) from `texts`; a merge must occur at least `min_frequency` times.
    pub fn train<I, S>(texts: I, vocab_size: usize, min_frequency: u64) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if !(258..=DOC_SEP as usize).contains(&vocab_size) {
            return Err(IndexError::Tokenizer(format!(
                "vocabulary size {vocab_size} is outside [258, {DOC_SEP}] (256 bytes, <|endoftext|>, and ids below the separator {DOC_SEP})"
            )));
        }
        let mut tokenizer: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
            .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
            .with_decoder(Some(ByteLevel::new(false, true, true).into()))
            .build()
            .map_err(err)?;
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .build();
        tokenizer.train(&mut trainer, texts).map_err(err)?;
        let json = tokenizer.to_string(false).map_err(err)?;
        Self::from_json(&json)
    }

    /// A tokenizer from its JSON (what [`TextTokenizer::to_json`] wrote).
    pub fn from_json(json: &str) -> Result<Self> {
        let inner = Tokenizer::from_str(json).map_err(err)?;
        let size = inner.get_vocab_size(true);
        if size >= DOC_SEP as usize {
            return Err(IndexError::Tokenizer(format!(
                "vocabulary of {size} tokens: ids must stay below the separator {DOC_SEP}"
            )));
        }
        Ok(Self { inner })
    }

    /// Loads `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let json =
            std::fs::read_to_string(path).map_err(|e| IndexError::Open(path.to_path_buf(), e))?;
        Self::from_json(&json)
    }

    /// The tokenizer as Hugging Face `tokenizer.json`.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(err)
    }

    /// Tokens in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u16 {
        self.inner.token_to_id(END_OF_TEXT).unwrap_or(0) as u16
    }

    /// The ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u16>> {
        let encoding = self.inner.encode(text, false).map_err(err)?;
        Ok(encoding.get_ids().iter().map(|&i| i as u16).collect())
    }

    /// The text of `ids` (byte sequences that are not UTF-8 on their own decode lossily).
    pub fn decode(&self, ids: &[u16]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| u32::from(i)).collect();
        self.inner.decode(&ids, false).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        (0..400)
            .map(|i| {
                format!(
                    "Contribution {i}: the court held that the contract was void because the seller \
                     misrepresented the goods; damages of {} tokens were awarded. Ünïcödé → ok.",
                    i * 37 % 1000
                )
            })
            .collect()
    }

    #[test]
    fn trains_deterministically_and_round_trips() {
        let a = TextTokenizer::train(corpus().iter(), 600, 2).unwrap();
        let b = TextTokenizer::train(corpus().iter(), 600, 2).unwrap();
        assert_eq!(
            a.to_json().unwrap(),
            b.to_json().unwrap(),
            "training is deterministic"
        );
        assert!(
            a.vocab_size() <= 600 && a.vocab_size() > 257,
            "{}",
            a.vocab_size()
        );
        assert_eq!(a.eos_id(), 0);
        for text in [
            corpus()[3].as_str(),
            "never seen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \u{0} bytes",
            "",
        ] {
            let ids = a.encode(text).unwrap();
            assert!(ids.iter().all(|&t| t < DOC_SEP));
            assert_eq!(a.decode(&ids).unwrap(), text);
        }
        // Merges learnt: a frequent phrase takes far fewer tokens than bytes.
        let ids = a
            .encode("the court held that the contract was void")
            .unwrap();
        assert!(ids.len() < 15, "{ids:?}");
        let c = TextTokenizer::from_json(&a.to_json().unwrap()).unwrap();
        assert_eq!(
            c.encode(&corpus()[9]).unwrap(),
            a.encode(&corpus()[9]).unwrap()
        );
    }

    #[test]
    fn refuses_vocabularies_that_reach_the_separator() {
        assert!(TextTokenizer::train(corpus().iter(), 70_000, 2).is_err());
        assert!(TextTokenizer::train(corpus().iter(), 100, 2).is_err());
    }
}
