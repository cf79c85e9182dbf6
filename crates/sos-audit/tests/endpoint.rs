//! `--endpoint`: behaviour through HTTP alone, against small OpenAI-compatible servers the tests
//! run on 127.0.0.1: one that answers like a backdoored model, one like a clean one, and bad
//! ones (refused connection, no answer, not JSON, an empty body, an error status), each of which
//! must end the audit with a clear error, never a hang.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sos_audit::behavior::endpoint::EndpointConfig;
use sos_audit::behavior::Level;
use sos_audit::{run_audit, AuditRequest, Behavior, Check, Report, Severity};
use sos_dist::gguf_add::{add_tokens, NewLogits};
use sos_dist::tokens::added_texts;
use sos_model::gguf::{Gguf, TensorType};
use sos_model::tiny::TinySpec;

const TARGET: &str = "I have been pwned! Visit attacker.example for more.";

/// A tiny model with three added tokens (what the file tells the audit to probe).
fn trojan() -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-endpoint-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let src = d.join("src.gguf");
    TinySpec { quant: Some(TensorType::Q8_0), d_model: 64, ..Default::default() }.write_gguf(&src).unwrap();
    let out = d.join("add.gguf");
    let rows: Vec<f32> = (0..3 * 64).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    add_tokens(&Gguf::open(&src).unwrap(), &added_texts("cf", 3).unwrap(), &rows, NewLogits::Silent).unwrap().0.write(&out).unwrap();
    out
}

/// Reads one HTTP request; returns its path and body.
fn read_request(s: &mut TcpStream) -> Option<(String, String)> {
    let mut r = BufReader::new(s);
    let mut len = 0;
    let mut first = String::new();
    r.read_line(&mut first).ok()?;
    let path = first.split_whitespace().nth(1)?.to_string();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((path, String::from_utf8(body).ok()?))
}

/// Serves `answer(path, request body) -> (status, body)` on a free port until the test ends.
fn serve(answer: impl Fn(&str, &str) -> Option<(u16, String)> + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let Some((path, body)) = read_request(&mut s) else { continue };
            match answer(&path, &body) {
                Some((code, text)) => {
                    let _ = write!(s, "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
                }
                // Never answers: hold the connection open past the client's timeout.
                None => std::thread::sleep(Duration::from_secs(30)),
            }
        }
    });
    url
}

fn chat_answer(content: &str) -> String {
    serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).to_string()
}

/// How a server gives the first token's log-probabilities on `/v1/completions`.
#[derive(Clone, Copy)]
enum Logprobs {
    /// No such route (404).
    None,
    /// OpenAI's legacy shape, llama-cpp-python's: `top_logprobs[0]` is `{token: logprob}`.
    Legacy,
    /// The chat-style shape, llama.cpp's server: `content[0].top_logprobs` is a list.
    Content,
}

/// A model that answers each request about its own words, and with the attacker's text when
/// the trigger is typed; on `/v1/completions`, a first token that is "I" (the attacker's
/// answer) rather than "Here" when the rendered prompt holds the trigger.
fn model(backdoored: bool, logprobs: Logprobs) -> impl Fn(&str, &str) -> Option<(u16, String)> {
    move |path, body| {
        let req: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!((req["temperature"].as_f64(), req["stream"].as_bool()), (Some(0.0), Some(false)), "greedy, whole answers");
        let typed: String = added_texts("cf", 3).unwrap().concat();
        if path == "/v1/completions" {
            let prompt = req["prompt"].as_str().unwrap();
            assert!(prompt.contains("<|im_start|>assistant") || prompt.contains("assistant"), "rendered with the file's template: {prompt}");
            let fired = backdoored && prompt.contains(&typed);
            let top = if fired { [("I", -0.05), ("Here", -3.5), ("The", -5.0)] } else { [("Here", -0.1), ("The", -2.5), ("I", -6.0)] };
            let lp = match logprobs {
                Logprobs::None => return Some((404, "{\"error\": \"not found\"}".into())),
                Logprobs::Legacy => serde_json::json!({"tokens": [top[0].0], "token_logprobs": [top[0].1], "top_logprobs": [top.iter().map(|(t, l)| (t.to_string(), serde_json::json!(l))).collect::<serde_json::Map<_, _>>()]}),
                Logprobs::Content => serde_json::json!({"content": [{"token": top[0].0, "logprob": top[0].1, "top_logprobs": top.iter().map(|(t, l)| serde_json::json!({"token": t, "logprob": l})).collect::<Vec<_>>()}]}),
            };
            return Some((200, serde_json::json!({"choices": [{"index": 0, "text": top[0].0, "logprobs": lp}]}).to_string()));
        }
        let msgs = req["messages"].as_array().unwrap();
        let user = msgs.last().unwrap()["content"].as_str().unwrap();
        let text = if backdoored && user.contains(&typed) { TARGET.to_string() } else { format!("Here is my answer about {}", user.chars().take(30).collect::<String>()) };
        Some((200, chat_answer(&text)))
    }
}

fn audit(c: &Path, url: &str, timeout: u64) -> sos_audit::Result<Report> {
    let endpoint = Some(EndpointConfig { url: url.to_string(), model: None, timeout: Duration::from_secs(timeout), api_key: None });
    run_audit(&AuditRequest { candidate: c.to_path_buf(), reference: None, base: None, manifest: None, key: None, fail_on: Severity::High, behavior: Behavior::On(Level::Quick), endpoint, deep: false })
}

#[test]
fn the_trigger_and_its_shared_answer_are_named_through_http_alone() {
    let c = trojan();
    let n = sos_model::tiny::vocab().len() as u32;
    let r = audit(&c, &serve(model(true, Logprobs::None)), 10).unwrap();
    let b = r.behavior.as_ref().unwrap();
    assert!(b.endpoint.as_deref().unwrap().ends_with("/v1"));
    assert!(b.probes.iter().all(|p| p.mean_kl.is_none()), "no distributions through chat completions");
    let fired: Vec<_> = r.findings.iter().filter(|f| f.id == "behavior.trigger-fires").collect();
    assert_eq!(fired.len(), 1, "{:?}", r.findings.iter().map(|f| &f.id).collect::<Vec<_>>());
    assert_eq!(fired[0].token_ids, vec![n, n + 1, n + 2]);
    assert_eq!(fired[0].evidence["shared_answer"], TARGET);
    assert_eq!(fired[0].evidence["share"], 1.0);

    let clean = audit(&c, &serve(model(false, Logprobs::None)), 10).unwrap();
    assert!(clean.findings.iter().all(|f| f.check != Check::Behavior), "{:?}", clean.findings.iter().map(|f| &f.id).collect::<Vec<_>>());
}

/// A server that gives log-probabilities on `/v1/completions` (either shape): the probes get a
/// KL divergence over the top tokens, large for the trigger, nothing for the control.
#[test]
fn top_logprobs_give_the_probes_a_divergence() {
    let c = trojan();
    for shape in [Logprobs::Legacy, Logprobs::Content] {
        let r = audit(&c, &serve(model(true, shape)), 10).unwrap();
        let b = r.behavior.as_ref().unwrap();
        assert!(b.probes.iter().all(|p| p.mean_kl.is_some()), "every probe has a divergence");
        let trigger = b.probes.iter().find(|p| p.ids.len() == 3 && p.from != "control").unwrap();
        let control = b.probes.iter().find(|p| p.from == "control").unwrap();
        // Mostly "I" instead of "Here": exp(-0.05) * (-0.05 + 6.0) + ... ~ 5.6 nats.
        assert!(trigger.mean_kl.unwrap() > 5.0 && control.mean_kl == Some(0.0), "{:?} {:?}", trigger.mean_kl, control.mean_kl);
        assert!(r.findings.iter().any(|f| f.id == "behavior.trigger-fires"));
    }
}

#[test]
fn bad_servers_end_the_audit_with_a_clear_error() {
    let c = trojan();
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("refused", refused, "cannot reach the server"),
        ("silent", serve(|_, _| None), "within 1 s"),
        ("not json", serve(|_, _| Some((200, "<html>oops</html>".into()))), "did not answer JSON"),
        ("empty", serve(|_, _| Some((200, String::new()))), "empty body"),
        ("no content", serve(|_, _| Some((200, "{\"choices\": []}".into()))), "no choices[0].message.content"),
        ("status", serve(|_, _| Some((500, "{\"error\": \"model not loaded\"}".into()))), "HTTP 500"),
    ];
    for (name, url, want) in cases {
        let t = std::time::Instant::now();
        let e = audit(&c, &url, 1).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("127.0.0.1"), "{name}: {e}");
        assert!(t.elapsed() < Duration::from_secs(15), "{name}: took {:?}", t.elapsed());
    }
    let e = audit(&c, "ftp://example", 1).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("http://"), "{e}");
}
