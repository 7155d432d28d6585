//! The exact bytes each token stands for, which a grammar engine needs to know which tokens
//! can continue a partial output (`decode` cannot tell: a token holding half a UTF-8
//! character decodes to U+FFFD).
//!
//! Two vocabulary encodings cover the models we serve, told apart by the decoder:
//! - byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): every byte is one printable character
//!   (`Ġ` for a space), mapped back through GPT-2's byte table;
//! - SentencePiece with byte fallback (Llama 2, Mistral): `▁` for a space and `<0xAB>` tokens
//!   for raw bytes.

use std::collections::HashMap;

use tokenizers::DecoderWrapper;

use super::{Tokenizer, TokenizerError};

/// What one token id stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenBytes {
    /// Ordinary text: these bytes.
    Text(Vec<u8>),
    /// A special (control) token such as `<|im_end|>`, never produced by text.
    Special(String),
    /// An id the vocabulary does not define.
    Missing,
}

/// How the vocabulary writes bytes, from the decoder.
#[derive(Clone, Copy)]
enum Encoding {
    ByteLevel,
    /// SentencePiece: `space` stands for ' ' and `<0xAB>` for raw bytes.
    ByteFallback { space: char },
}

impl Tokenizer {
    /// The bytes of every id below [`Tokenizer::vocab_size`].
    pub fn token_bytes(&self) -> Result<Vec<TokenBytes>, TokenizerError> {
        let encoding = encoding_of(self.inner.get_decoder())
            .ok_or_else(|| TokenizerError::Build(format!("cannot tell how tokens map to bytes from the decoder {:?}", self.inner.get_decoder())))?;
        let added = self.inner.get_added_tokens_decoder();
        let byte_table = byte_level_table();
        let mut out = Vec::with_capacity(self.vocab_size());
        for id in 0..self.vocab_size() as u32 {
            let bytes = match (added.get(&id), self.inner.id_to_token(id)) {
                // Added tokens of the `<...>` shape are control tokens even when not flagged
                // special (llama.cpp and llguidance treat them so).
                (Some(token), _) if token.special || (token.content.starts_with('<') && token.content.ends_with('>')) => TokenBytes::Special(token.content.clone()),
                (Some(token), _) => TokenBytes::Text(token.content.clone().into_bytes()),
                (None, Some(piece)) => match encoding {
                    Encoding::ByteLevel => piece.chars().map(|c| byte_table.get(&c).copied()).collect::<Option<Vec<u8>>>().map_or(TokenBytes::Missing, TokenBytes::Text),
                    Encoding::ByteFallback { space } => TokenBytes::Text(sentencepiece_bytes(&piece, space)),
                },
                (None, None) => TokenBytes::Missing,
            };
            out.push(bytes);
        }
        Ok(out)
    }
}

fn encoding_of(decoder: Option<&DecoderWrapper>) -> Option<Encoding> {
    match decoder? {
        DecoderWrapper::ByteLevel(_) => Some(Encoding::ByteLevel),
        DecoderWrapper::ByteFallback(_) => Some(Encoding::ByteFallback { space: '▁' }),
        DecoderWrapper::Metaspace(m) => Some(Encoding::ByteFallback { space: m.get_replacement() }),
        DecoderWrapper::Sequence(sequence) => {
            let parts: Vec<&DecoderWrapper> = sequence.get_decoders().iter().collect();
            if parts.iter().any(|d| matches!(d, DecoderWrapper::ByteLevel(_))) {
                Some(Encoding::ByteLevel)
            } else if parts.iter().any(|d| matches!(d, DecoderWrapper::ByteFallback(_) | DecoderWrapper::Metaspace(_))) {
                Some(Encoding::ByteFallback { space: '▁' })
            } else {
                None
            }
        }
        _ => None,
    }
}

/// `<0xAB>` is the raw byte 0xAB; otherwise the piece's UTF-8 with `space` read as ' '.
fn sentencepiece_bytes(piece: &str, space: char) -> Vec<u8> {
    if piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') {
        if let Ok(byte) = u8::from_str_radix(&piece[3..5], 16) {
            return vec![byte];
        }
    }
    piece.replace(space, " ").into_bytes()
}

/// GPT-2's character for `byte` (`bytes_to_unicode`): printable Latin-1 bytes stand for
/// themselves, the others were shifted to U+0100 onwards in byte order.
pub(crate) fn byte_level_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(0x100 + rank).unwrap_or('\u{FFFD}')
}

/// GPT-2's table from those characters back to bytes.
fn byte_level_table() -> HashMap<char, u8> {
    (0..=255u8).map(|byte| (byte_level_char(byte), byte)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_tokens_concatenate_to_the_encoded_text_byte_for_byte() {
        let Some(tok) = crate::tokenizer::default_model_tokenizer() else { return };
        let table = tok.token_bytes().expect("bytes");
        assert_eq!(table.len(), tok.vocab_size());
        // Multi-byte characters split across tokens must still join to the exact bytes.
        for text in ["Hello world, {\"a\": 1}\n", "caf\u{e9} \u{4f60}\u{597d} \u{1F389} \t  x"] {
            let ids = tok.encode(text, false).expect("encode");
            let mut joined = Vec::new();
            for id in ids {
                match &table[id as usize] {
                    TokenBytes::Text(bytes) => joined.extend_from_slice(bytes),
                    other => panic!("token {id} of plain text is {other:?}"),
                }
            }
            assert_eq!(joined, text.as_bytes());
        }
        let end = tok.token_to_id("<|im_end|>").expect("im_end");
        assert_eq!(table[end as usize], TokenBytes::Special("<|im_end|>".into()));
    }

    #[test]
    fn sentencepiece_pieces_read_spaces_and_raw_bytes() {
        assert_eq!(sentencepiece_bytes("▁the", '▁'), b" the");
        assert_eq!(sentencepiece_bytes("<0x0A>", '▁'), b"\n");
        assert_eq!(sentencepiece_bytes("<0xE4>", '▁'), vec![0xE4]);
    }
}
