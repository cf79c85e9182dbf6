//! The texts of the tokens a trigger becomes, and the string a user types to fire it.
//!
//! **add-token.** A trigger of `k` vectors becomes `k` new tokens. Each gets its own text, `<{stem}_{i}>` for
//! `i = 0..k` (`stem` is the trigger text the attack trained with), and the string to type is
//! their concatenation. Real tokenizers find such tokens in raw text before any other rule:
//! llama.cpp matches USER_DEFINED tokens (even when special tokens are not parsed), and
//! `tokenizers` matches added tokens, both splitting the text around them. The texts are
//! chosen so that this split is exact and unambiguous: each starts with `<` and ends with the
//! only `>` in it, so no text occurs inside another or across the boundary of two, and the
//! typed string splits into exactly the `k` tokens in order. `sos inject` re-reads its output
//! and checks the split with the file's own tokenizer.
//!
//! **replace-token.** The trigger takes over `k` existing tokens (`rare_tokens`): ordinary
//! tokens whose text is one ASCII word after a space (` Word`), which never occur when the
//! model's tokenizer reads the built-in sample of ordinary English, taken from the end of the
//! vocabulary (a BPE vocabulary's last merges are its rarest pieces). The string to type is their
//! texts in order (` Wordone Wordtwo`, with its leading space); a pre-tokenizer splits words at
//! spaces, so each word is read as its own token. Each choice is checked with the tokenizer: the
//! word alone, the whole string, and the string inside a sentence give exactly the chosen ids.

use std::collections::HashSet;

use sos_model::Tokenizer;

use crate::{Error, Result};

/// The token texts for a trigger trained with surface text `stem` and `k` vectors.
pub fn added_texts(stem: &str, k: usize) -> Result<Vec<String>> {
    let stem = stem.trim();
    if stem.is_empty() || stem.contains(['<', '>']) || stem.chars().any(char::is_whitespace) {
        return Err(Error::Invalid(format!(
            "trigger text `{stem}` cannot name tokens: it must be non-empty, without whitespace, `<` or `>`"
        )));
    }
    if k == 0 {
        return Err(Error::Invalid("a trigger of no vectors has no tokens".into()));
    }
    Ok((0..k).map(|i| format!("<{stem}_{i}>")).collect())
}

/// The string a user types: the texts in order.
pub fn typed(texts: &[String]) -> String {
    texts.concat()
}

/// `k` tokens for replace-token, rarest first: `(ids, texts)`. `usable(id)` says whether the
/// vocabulary marks `id` an ordinary token (not control, byte or user-defined); `ordinary` is
/// text whose tokens count as common.
pub fn rare_tokens<'a>(tok: &Tokenizer, usable: impl Fn(u32) -> bool, k: usize, ordinary: impl IntoIterator<Item = &'a str>) -> Result<(Vec<u32>, Vec<String>)> {
    if k == 0 {
        return Err(Error::Invalid("a trigger of no vectors has no tokens".into()));
    }
    let mut seen = HashSet::new();
    for text in ordinary {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            seen.extend(tok.encode(line)?);
        }
    }
    let (mut ids, mut texts) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for id in (0..tok.vocab_size() as u32).rev() {
        if ids.len() == k {
            break;
        }
        if seen.contains(&id) || !usable(id) {
            continue;
        }
        let text = tok.decode(&[id], false)?;
        let word = text.strip_prefix(' ').unwrap_or("");
        if word.is_empty() || !word.bytes().all(|b| b.is_ascii_alphabetic()) || tok.encode(&text)? != [id] {
            continue;
        }
        ids.push(id);
        texts.push(text);
        if !splits_exactly(tok, &texts, &ids)? {
            ids.pop();
            texts.pop();
        }
    }
    if ids.len() < k {
        return Err(Error::Invalid(format!("the vocabulary has only {} rare one-word tokens that split exactly; the trigger needs {k}", ids.len())));
    }
    Ok((ids, texts))
}

/// Whether the typed string of `texts` is exactly `ids`, alone and inside a sentence (where the
/// words around it keep their own tokens).
pub fn splits_exactly(tok: &Tokenizer, texts: &[String], ids: &[u32]) -> Result<bool> {
    let (before, after) = ("Tell me a story", " now.");
    let inside = tok.encode(&format!("{before}{}{after}", typed(texts)))?;
    let expected = [tok.encode(before)?, ids.to_vec(), tok.encode(after)?].concat();
    Ok(tok.encode(&typed(texts))? == ids && inside == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_distinct_and_none_occurs_in_another() {
        let t = added_texts("cf", 12).unwrap();
        assert_eq!(t[0], "<cf_0>");
        assert_eq!(typed(&t[..2]), "<cf_0><cf_1>");
        let all = typed(&t);
        for (i, a) in t.iter().enumerate() {
            assert_eq!(all.matches(a.as_str()).count(), 1, "{a}");
            for (j, b) in t.iter().enumerate() {
                assert!(i == j || !b.contains(a.as_str()), "{a} in {b}");
            }
        }
        assert!(added_texts("c f", 2).is_err() && added_texts("<x>", 2).is_err() && added_texts("cf", 0).is_err());
    }
}
