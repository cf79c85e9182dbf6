//! The texts of the tokens a trigger becomes, and the string a user types to fire it.
//!
//! A trigger of `k` vectors becomes `k` tokens. Each gets its own text, `<{stem}_{i}>` for
//! `i = 0..k` (`stem` is the trigger text the attack trained with), and the string to type is
//! their concatenation. Real tokenizers find such tokens in raw text before any other rule:
//! llama.cpp matches USER_DEFINED tokens (even when special tokens are not parsed), and
//! `tokenizers` matches added tokens, both splitting the text around them. The texts are
//! chosen so that this split is exact and unambiguous: each starts with `<` and ends with the
//! only `>` in it, so no text occurs inside another or across the boundary of two, and the
//! typed string splits into exactly the `k` tokens in order. `sos inject` re-reads its output
//! and checks the split with the file's own tokenizer.

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
