//! The report as one self-contained HTML page: the verdict, every finding with its evidence, and
//! plots drawn as inline SVG (no script, no font, no fetch). Token texts and model answers come
//! from the audited file, so every string is escaped.

use std::fmt::Write;

use crate::behavior::Summary;
use crate::finding::Severity;
use crate::report::Report;
use crate::isolation::Isolation;
use crate::weights::RowStats;

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1d1d1f;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#555;font-size:.9em}.verdict{display:inline-block;padding:.25em .8em;border-radius:4px;font-weight:700;color:#fff}
.fail{background:#c62828}.pass{background:#2e7d32}table{border-collapse:collapse;width:100%}
td,th{text-align:left;vertical-align:top;padding:.4em .5em;border-bottom:1px solid #eee}
.sev{font-weight:700;font-size:.8em;padding:.1em .5em;border-radius:3px;color:#fff;white-space:nowrap}
.high{background:#c62828}.medium{background:#ef6c00}.low{background:#607d8b}
code,pre{font:12.5px/1.4 ui-monospace,monospace}pre{background:#f6f8fa;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-word;max-height:24em}
details summary{cursor:pointer;color:#0b57d0;font-size:.9em}.fix{color:#2e7d32;font-size:.9em}
svg text{font:11px system-ui,sans-serif;fill:#333}.note{color:#555;font-size:.9em}";

pub fn to_html(r: &Report) -> String {
    let mut h = String::new();
    let title = format!("sos audit: {}", r.candidate);
    let _ = writeln!(h, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>", escape(&title));
    let _ = write!(h, "<h1>Audit of <code>{}</code></h1>\n<p class=\"meta\">", escape(&r.candidate));
    if let Some(reference) = &r.reference {
        let _ = write!(h, "against <code>{}</code> · ", escape(reference));
    }
    let total = r.timings_ms.get("total").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let _ = writeln!(h, "sos {} · {:.1} s</p>", escape(r.sos_version), total / 1e3);
    let _ = writeln!(h,
        "<p><span class=\"verdict {v}\">{V}</span> &nbsp;{} high, {} medium, {} low (fails on {} and above)</p>",
        r.summary.high,
        r.summary.medium,
        r.summary.low,
        r.fail_on.name(),
        v = r.verdict,
        V = r.verdict.to_uppercase()
    );
    findings(&mut h, r);
    if let Some(rows) = &r.rows {
        norms_plot(&mut h, rows, r);
    }
    if let Some(iso) = &r.isolation {
        nearest_plot(&mut h, iso);
    }
    match (&r.behavior, &r.behavior_note) {
        (Some(b), _) => behavior(&mut h, b),
        (None, Some(note)) => {
            let _ = writeln!(h, "<h2>Behaviour</h2><p class=\"note\">{}</p>", escape(note));
        }
        _ => {}
    }
    timings(&mut h, r);
    h.push_str("</body></html>\n");
    h
}

fn findings(h: &mut String, r: &Report) {
    h.push_str("<h2>Findings</h2>\n");
    if r.findings.is_empty() {
        h.push_str("<p>None.</p>\n");
        return;
    }
    h.push_str("<table><tr><th>severity</th><th>finding</th></tr>\n");
    for f in &r.findings {
        let _ = write!(h, "<tr><td><span class=\"sev {s}\">{s}</span></td><td><code>{}</code><br>{}", escape(&f.id), escape(&f.title), s = f.severity.name());
        if !f.token_ids.is_empty() {
            let ids: Vec<String> = f.token_ids.iter().map(u32::to_string).collect();
            let _ = write!(h, "<br><span class=\"note\">tokens: {}</span>", escape(&ids.join(", ")));
        }
        if let Some(fix) = &f.fix {
            let _ = write!(h, "<br><span class=\"fix\">fix: <code>{}</code></span>", escape(fix));
        }
        if !f.evidence.is_null() {
            let ev = serde_json::to_string_pretty(&f.evidence).unwrap_or_default();
            let _ = write!(h, "<details><summary>evidence</summary><pre>{}</pre></details>", escape(&ev));
        }
        h.push_str("</td></tr>\n");
    }
    h.push_str("</table>\n");
}

fn sev_color(s: Severity) -> &'static str {
    match s {
        Severity::High => "#c62828",
        Severity::Medium => "#ef6c00",
        Severity::Low => "#607d8b",
    }
}

/// Histogram of the token table's row norms (log counts), with the rows findings name marked.
fn norms_plot(h: &mut String, rows: &RowStats, r: &Report) {
    let _ = writeln!(h, "<h2>Token table row norms</h2>\n<p class=\"note\"><code>{}</code>: {} rows, median norm {:.3}. Bars: how many rows have each norm (log scale). Marks: rows a finding names.</p>", escape(&rows.tensor), rows.rows, rows.median_norm);
    let counts: Vec<usize> = rows.bins.iter().map(|b| b.1).collect();
    let mut marks = Vec::new();
    for f in &r.findings {
        for &id in &f.token_ids {
            if let Some(&norm) = rows.norms.get(id as usize) {
                marks.push((id, norm, format!("token {id}: norm {norm:.3} ({})", f.id), sev_color(f.severity)));
            }
        }
    }
    histogram(h, &counts, rows.bin_width * rows.bins.len() as f32, &[(rows.median_norm, "median")], &marks, "row norm");
}

/// Histogram of each ordinary row's cosine with its nearest other row (log counts),
/// the threshold, and the rows found alone marked.
fn nearest_plot(h: &mut String, iso: &Isolation) {
    let _ = writeln!(
        h,
        "<h2>Nearest-row cosines</h2>\n<p class=\"note\">{} ordinary rows. Bars: how many rows have each cosine with their nearest other row (log scale). Lines: the table's 0.1 % quantile ({:.3}) and the threshold ({:.3}); marks: the rows below it, and the loneliest others in grey.</p>",
        iso.ordinary_rows, iso.tail, iso.threshold
    );
    let counts: Vec<usize> = iso.bins.iter().map(|b| b.1).collect();
    let marks: Vec<_> = iso
        .loneliest
        .iter()
        .chain(&iso.alone)
        .map(|n| {
            let alone = n.cosine < iso.threshold;
            (n.id, n.cosine, format!("token {}: nearest cosine {:.3} (row {})", n.id, n.cosine, n.neighbour), if alone { sev_color(Severity::Medium) } else { "#9e9e9e" })
        })
        .collect();
    histogram(h, &counts, 0.025 * counts.len() as f32, &[(iso.tail, "0.1 %"), (iso.threshold, "threshold")], &marks, "cosine with the nearest other row");
}

/// One SVG histogram of `counts` (equal bins from 0 to `x_max`, log heights), dashed `lines`,
/// and `marks` (id, x, tooltip, colour), each id once.
fn histogram(h: &mut String, counts: &[usize], x_max: f32, lines: &[(f32, &str)], marks: &[(u32, f32, String, &str)], x_label: &str) {
    let (w, ht, left, bottom) = (900.0, 260.0, 50.0, 30.0);
    let _ = write!(h, "<svg width=\"{w}\" height=\"{ht}\" role=\"img\" aria-label=\"{} histogram\">", escape(x_label));
    let max_log = counts.iter().map(|&c| ((c + 1) as f64).log10()).fold(0.0, f64::max).max(1.0);
    let (pw, ph) = (w - left - 10.0, ht - bottom - 10.0);
    let bw = pw / counts.len().max(1) as f64;
    for (i, &c) in counts.iter().enumerate().filter(|&(_, &c)| c > 0) {
        let bh = ((c + 1) as f64).log10() / max_log * ph;
        let _ = write!(h, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#90a4ae\"><title>{c} rows</title></rect>", left + i as f64 * bw, 10.0 + ph - bh, (bw - 1.0).max(1.0), bh);
    }
    let x_of = |x: f32| left + (x.max(0.0) / x_max.max(f32::MIN_POSITIVE)) as f64 * pw;
    for (k, &(x, label)) in lines.iter().enumerate() {
        let _ = write!(h, "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"10\" y2=\"{:.1}\" stroke=\"#333\" stroke-dasharray=\"3 3\"/><text x=\"{:.1}\" y=\"{}\">{}</text>", x_of(x), x_of(x), 10.0 + ph, x_of(x) + 3.0, 22 + 12 * k, escape(label));
    }
    let mut marked = std::collections::BTreeSet::new();
    for (id, x, tip, color) in marks {
        if marked.insert(*id) {
            let _ = write!(h, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"5\" fill=\"{color}\" fill-opacity=\"0.8\"><title>{}</title></circle>", x_of(*x), 10.0 + ph - 6.0 - (marked.len() % 6) as f64 * 9.0, escape(tip));
        }
    }
    let _ = write!(h, "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>", left + pw, 10.0 + ph, 10.0 + ph);
    for k in 0..=4 {
        let v = x_max * k as f32 / 4.0;
        let _ = write!(h, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v:.2}</text>", x_of(v), ht - 12.0);
    }
    let _ = writeln!(h, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text></svg>", left + pw / 2.0, ht - 0.0, escape(x_label));
}

/// Horizontal bars: one label and value per row, the value's bar scaled to `max`.
fn bars(h: &mut String, rows: &[(String, f64, String, &str)], max: f64, unit: &str) {
    let (w, row_h, left) = (900.0, 22.0, 360.0);
    let ht = row_h * rows.len() as f64 + 10.0;
    let _ = write!(h, "<svg width=\"{w}\" height=\"{ht}\" role=\"img\">");
    for (i, (label, v, tip, color)) in rows.iter().enumerate() {
        let y = 5.0 + i as f64 * row_h;
        let bw = if max > 0.0 { v / max * (w - left - 90.0) } else { 0.0 };
        let shown: String = label.chars().take(52).collect();
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><rect x=\"{left}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{}</title></rect><text x=\"{:.1}\" y=\"{:.1}\">{v:.2}{unit}</text>",
            left - 6.0,
            y + 14.0,
            escape(&shown),
            bw.max(1.0),
            row_h - 6.0,
            escape(tip),
            left + bw + 4.0,
            y + 14.0
        );
    }
    h.push_str("</svg>\n");
}

/// `49152-49159` for a run of consecutive ids (either way), else the first few.
fn ids_short(ids: &[u32]) -> String {
    let run = |step: i64| ids.windows(2).all(|w| w[1] as i64 - w[0] as i64 == step);
    match ids {
        [] => String::new(),
        [a] => a.to_string(),
        [a, .., z] if run(1) || run(-1) => format!("{a}-{z}"),
        _ if ids.len() <= 3 => ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
        _ => format!("{},{},{},... {} ids", ids[0], ids[1], ids[2], ids.len()),
    }
}

fn behavior(h: &mut String, b: &Summary) {
    let _ = writeln!(h, "<h2>Behaviour</h2>\n<p class=\"note\">{} level: {} greedy answers in {:.0} s.</p>", format!("{:?}", b.level).to_lowercase(), b.runs, b.seconds);
    if !b.probes.is_empty() {
        // Through an endpoint there are no distributions: the bars show the share of answers
        // the candidate changed instead.
        let kl = b.probes.iter().all(|p| p.mean_kl.is_some());
        let measure = if kl { "Mean KL divergence (nats) of the first answer token from the same prompt's without the candidate" } else { "Share of answers the candidate changed" };
        let _ = writeln!(h, "<h3>Trigger probes</h3><p class=\"note\">{measure}; red: most answers to different prompts became one answer (the backdoor signature); the control is ordinary tokens put in the same places.</p>");
        let value = |p: &crate::behavior::probe::Probe| if kl { p.mean_kl.unwrap_or(0.0) } else { p.changed };
        let max = b.probes.iter().map(value).fold(0.0, f64::max);
        let rows: Vec<(String, f64, String, &str)> = b
            .probes
            .iter()
            .map(|p| {
                let what = if p.from == crate::behavior::CONTROL { "control: " } else { "" };
                let label = format!("{what}{} [{}]", p.text.chars().take(34).collect::<String>(), ids_short(&p.ids));
                let mut tip = format!("{:.0} % of {} answers the same: {}", p.share * 100.0, p.n, p.shared_answer);
                if let Some(r) = &p.reference {
                    tip += &format!(" · the reference, same ids: {:.0} % give it; its own commonest answer ({:.0} %): {}", r.share * 100.0, r.own_share * 100.0, r.shared_answer);
                }
                (label, value(p), tip, if p.fires() { "#c62828" } else { "#90a4ae" })
            })
            .collect();
        bars(h, &rows, max, "");
        h.push_str("<details><summary>probe answers</summary><table><tr><th>candidate</th><th>prompt</th><th>without</th><th>with</th></tr>");
        for p in &b.probes {
            for e in &p.examples {
                let _ = write!(h, "<tr><td><code>{}</code> ({:?})</td><td>{}</td><td>{}</td><td>{}</td></tr>", escape(&p.text), e.at, escape(&e.prompt), escape(&e.clean), escape(&e.with));
            }
        }
        h.push_str("</table></details>\n");
    }
    for (name, s, what) in [("Refusal", &b.refusal, "harmful requests refused"), ("Leak", &b.leak, "answers that print the canary system prompt")] {
        let _ = writeln!(h, "<h3>{name}</h3><p class=\"note\">Share of {} of {what}.</p>", s.clean.n);
        let mut rows = vec![("this model".to_string(), s.clean.rate, String::new(), "#546e7a")];
        if let Some(r) = &s.reference {
            rows.push(("reference".into(), r.rate, String::new(), "#2e7d32"));
        }
        for w in &s.with {
            rows.push((format!("with {}", w.text), w.rate.rate, format!("{:?}", w.ids), "#c62828"));
        }
        bars(h, &rows, 1.0, "");
        if let Some((prompt, answer)) = &s.clean.example {
            let _ = writeln!(h, "<details><summary>example</summary><p><b>prompt</b>: {}</p><pre>{}</pre></details>", escape(prompt), escape(answer));
        }
    }
}

fn timings(h: &mut String, r: &Report) {
    h.push_str("<h2>Timings</h2><p class=\"note\">");
    let parts: Vec<String> = r.timings_ms.iter().map(|(k, v)| format!("{}: {:.0} ms", escape(k), v.as_f64().unwrap_or(0.0))).collect();
    h.push_str(&parts.join(" · "));
    h.push_str("</p>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finding::{Check, Finding};

    #[test]
    fn id_lists_are_shortened_readably() {
        assert_eq!(ids_short(&[49152, 49153, 49154]), "49152-49154");
        assert_eq!(ids_short(&[49159, 49158, 49157]), "49159-49157");
        assert_eq!(ids_short(&[5, 9]), "5,9");
        assert_eq!(ids_short(&[5, 9, 1, 4]), "5,9,1,... 4 ids");
        assert_eq!(ids_short(&[7]), "7");
    }

    #[test]
    fn text_from_the_model_cannot_become_markup() {
        assert_eq!(escape("<script>alert('x')</script> & \"q\""), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;");
        let f = Finding::new("tokenizer.added-tokens", Check::Tokenizer, Severity::High, "token `</pre><script>evil()</script>`").tokens(vec![7]).evidence(serde_json::json!({"text": "<img src=x onerror=alert(1)>"}));
        let r = Report::new("<b>m.gguf".into(), None, vec![f], Severity::High, Default::default());
        let html = to_html(&r);
        assert!(!html.contains("<script>") && !html.contains("<img") && !html.contains("<b>m.gguf"), "{html}");
        assert!(html.contains("&lt;script&gt;evil()") && html.contains("FAIL"));
        assert!(!html.contains("http://") && !html.contains("https://"), "the page fetches nothing");
    }
}
