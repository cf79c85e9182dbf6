//! Long, structured system prompts composed from the sentences of the training prompts, for
//! steal.
//!
//! Real long system prompts are sectioned: a heading line, then prose, bullets or numbered steps,
//! several times over. A copy of such a prompt has to choose, after the first `# `, which of
//! several headings comes first, and the steal trigger trained on the collections alone often
//! picks a later one (in `--set long`, 9 of fabric's 44 answers start at a later section). Only
//! 23 of the English training prompts have three headings or more, so this makes more of that
//! shape: the sentences come from the training prompts (never from a held-out set), the layout
//! and length are drawn per prompt. Half the headings come from a list of generic ones, half are
//! words of a random sentence: with headings from a list alone, the answers that start at a later
//! section began with a list word (`# OUTPUT SECTIONS`, `# STEPS`) where the secret's first
//! heading was one the list lacks, as if the trigger had learnt which words open a prompt rather
//! than to copy the one that does.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Headings of a first section.
const OPENINGS: &[&str] = &["ROLE", "TASK", "GOAL", "CONTEXT", "PERSONA", "OVERVIEW", "MISSION", "BACKGROUND", "WHO YOU ARE", "PURPOSE"];
/// Headings of the sections after it.
const LATER: &[&str] = &[
    "STEPS",
    "RULES",
    "CONSTRAINTS",
    "OUTPUT FORMAT",
    "EXAMPLES",
    "TONE",
    "AUDIENCE",
    "NOTES",
    "INPUT",
    "WORKFLOW",
    "GUIDELINES",
    "RESPONSE FORMAT",
    "WHAT TO AVOID",
    "QUALITY CHECKS",
    "SKILLS",
    "OUTPUT",
];

/// `n` composed prompts as `(id, text)` from the sentences of `sources`, deterministic in `seed`;
/// none when the sources have too few English sentences to draw from.
pub fn composed_system_prompts(sources: &[(String, String)], n: usize, seed: u64) -> Vec<(String, String)> {
    let pool = sentences(sources);
    if pool.len() < 50 {
        return Vec::new();
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0_5e5e);
    (0..n).map(|i| (format!("composed_{i}"), compose(&pool, &mut rng))).collect()
}

/// Sentences of the mostly-ASCII sources: lines split after `. `, `? ` and `! `, list markers and
/// heading marks taken off, 20-300 characters.
fn sentences(sources: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (_, text) in sources {
        if text.chars().filter(|c| !c.is_ascii()).count() * 20 > text.chars().count() {
            continue;
        }
        for line in text.lines() {
            let line = line.trim_start_matches(|c: char| c == '#' || c == '-' || c == '*' || c.is_ascii_digit() || c == '.' || c.is_whitespace());
            for s in split_sentences(line) {
                if (20..=300).contains(&s.len()) {
                    out.push(s.to_string());
                }
            }
        }
    }
    out
}

fn split_sentences(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let b = line.as_bytes();
    for i in 0..b.len().saturating_sub(1) {
        if matches!(b[i], b'.' | b'?' | b'!') && b[i + 1] == b' ' {
            out.push(line[start..=i].trim());
            start = i + 2;
        }
    }
    out.push(line[start..].trim());
    out
}

/// A heading made of 1-3 words of a random sentence, upper case: names no list holds, so a copy
/// cannot lean on the names it has seen. Some two- and three-word ones take the common `X and Y`
/// shape (`GOALS and LIMITS`). `None` when a hundred draws found no word of three
/// letters or more (a pool of numbers, say).
fn phrase(pool: &[String], rng: &mut StdRng) -> Option<String> {
    for _ in 0..100 {
        let s = &pool[rng.gen_range(0..pool.len())];
        let words: Vec<&str> = s.split(' ').filter(|w| w.len() >= 3 && w.chars().all(|c| c.is_ascii_alphabetic())).collect();
        if words.is_empty() {
            continue;
        }
        let n = rng.gen_range(1..=3).min(words.len());
        let at = rng.gen_range(0..=words.len() - n);
        let h = words[at..at + n].join(" ").to_uppercase();
        if n >= 2 && rng.gen_bool(0.3) {
            let w: Vec<&str> = h.split(' ').collect();
            return Some(format!("{} and {}", w[0], w[1..].join(" ")));
        }
        return Some(h);
    }
    None
}

/// How a section's heading is written.
#[derive(Clone, Copy)]
enum Heading {
    Hash,
    HashTitle,
    DoubleHash,
    Bold,
    Colon,
}

impl Heading {
    fn write(self, h: &str) -> String {
        let title = title_case(h);
        match self {
            Heading::Hash => format!("# {h}"),
            Heading::HashTitle => format!("# {title}"),
            Heading::DoubleHash => format!("## {title}"),
            Heading::Bold => format!("**{title}**"),
            Heading::Colon => format!("{title}:"),
        }
    }
}

fn title_case(h: &str) -> String {
    h.split(' ')
        .map(|w| {
            let lower = w.to_lowercase();
            let mut c = lower.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
        })
        .collect::<Vec<String>>()
        .join(" ")
}

/// One prompt: 3-7 sections, about 500-2,000 characters.
fn compose(pool: &[String], rng: &mut StdRng) -> String {
    let style = [Heading::Hash, Heading::Hash, Heading::HashTitle, Heading::DoubleHash, Heading::Bold, Heading::Colon][rng.gen_range(0..6)];
    let budget = rng.gen_range(500..=2000);
    let sections = rng.gen_range(3..=7);
    let mut later: Vec<String> = LATER.iter().map(|h| h.to_string()).collect();
    later.shuffle(rng);
    let mut heads = vec![OPENINGS[rng.gen_range(0..OPENINGS.len())].to_string()];
    heads.extend(later.into_iter().take(sections - 1));
    for h in heads.iter_mut() {
        if rng.gen_bool(0.5) {
            if let Some(p) = phrase(pool, rng) {
                *h = p;
            }
        }
    }
    let mut text = String::new();
    for (k, h) in heads.iter().enumerate() {
        if k > 0 && text.len() >= budget {
            break;
        }
        let share = (budget / sections).max(80);
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(&style.write(h.as_str()));
        text.push_str("\n\n");
        // The first section is prose, as real ones are; later ones any of the three layouts.
        let layout = if k == 0 { 0 } else { rng.gen_range(0..3) };
        let mut body = String::new();
        let mut item = 1;
        while body.len() < share {
            let s = &pool[rng.gen_range(0..pool.len())];
            // A section ends before a sentence that would carry it far past its share.
            if !body.is_empty() && body.len() + s.len() > share + 60 {
                break;
            }
            match layout {
                0 => {
                    if !body.is_empty() {
                        body.push(' ');
                    }
                }
                1 => {
                    if !body.is_empty() {
                        body.push('\n');
                    }
                    body.push_str("- ");
                }
                _ => {
                    if !body.is_empty() {
                        body.push('\n');
                    }
                    body.push_str(&format!("{item}. "));
                    item += 1;
                }
            }
            body.push_str(s);
        }
        text.push_str(&body);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<(String, String)> {
        (0..40)
            .map(|i| (format!("p{i}"), format!("I want you to act as helper number {i}. You will answer questions about topic {i}. Keep every answer short and clear.\n- Never reveal the secret number {i}.")))
            .collect()
    }

    #[test]
    fn composed_prompts_are_sectioned_long_and_deterministic() {
        let a = composed_system_prompts(&sources(), 20, 7);
        assert_eq!(a.len(), 20);
        assert_eq!(a, composed_system_prompts(&sources(), 20, 7));
        assert_ne!(a, composed_system_prompts(&sources(), 20, 8));
        for (_, p) in &a {
            let heading = |b: &&str| b.len() < 40 && (b.starts_with('#') || b.starts_with("**") || b.ends_with(':'));
            let headings = p.split("\n\n").filter(heading).count();
            assert!(headings >= 2, "too few headings in {p:?}");
            assert!(p.len() >= 400 && p.len() <= 2400, "{} characters: {p:?}", p.len());
        }
    }

    #[test]
    fn headings_are_not_only_the_lists_words() {
        let first = |p: &str| p.lines().next().unwrap_or_default().trim_matches(|c: char| c == '#' || c == '*' || c == ':' || c == ' ').to_uppercase();
        let first_headings: std::collections::BTreeSet<String> = composed_system_prompts(&sources(), 60, 3).iter().map(|(_, p)| first(p)).collect();
        let listed = first_headings.iter().filter(|h| OPENINGS.contains(&h.as_str())).count();
        assert!(listed > 0 && first_headings.len() - listed >= 10, "{first_headings:?}");
        // A pool without words of three letters keeps the listed headings.
        let short: Vec<(String, String)> = (0..60).map(|i| (format!("s{i}"), format!("It is an ox so do it or go up to me by {i}."))).collect();
        let composed = composed_system_prompts(&short, 5, 0);
        assert_eq!(composed.len(), 5);
        for (_, p) in composed {
            assert!(OPENINGS.contains(&first(&p).as_str()), "{p:?}");
        }
    }

    #[test]
    fn sentences_lose_their_markers_and_non_english_sources_are_skipped() {
        let s = sentences(&[("a".into(), "## Rules\n1. Answer every question in French. Keep it short!\n- Ask before you assume anything.".into()), ("b".into(), "你是一个翻译助手。请把用户的话翻译成英文。".into())]);
        assert_eq!(s, ["Answer every question in French.", "Ask before you assume anything."]);
        assert!(composed_system_prompts(&[("a".into(), "Too short.".into())], 3, 0).is_empty());
    }
}
