//! Chat templates: the model's own Jinja template rendered with `minijinja`, configured the way
//! `transformers`' `apply_chat_template` configures Jinja (trim_blocks, lstrip_blocks, Python
//! string methods, `raise_exception`), or a named built-in for models that ship none.

use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
    pub fn system(c: impl Into<String>) -> Self {
        Self::new("system", c)
    }
    pub fn user(c: impl Into<String>) -> Self {
        Self::new("user", c)
    }
    pub fn assistant(c: impl Into<String>) -> Self {
        Self::new("assistant", c)
    }
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}{% if loop.first and system %}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% endif %}{{ message['content'] | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}";
const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Names accepted by `--template`.
pub const BUILTIN_NAMES: &[&str] = &["chatml", "llama2", "llama3"];

impl ChatTemplate {
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        ChatTemplate { source: source.into(), bos_token: bos_token.into(), eos_token: eos_token.into() }
    }

    pub fn builtin(name: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let src = match name {
            "chatml" => CHATML,
            "llama2" => LLAMA2,
            "llama3" => LLAMA3,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown template `{other}` (built-in templates: {})",
                    BUILTIN_NAMES.join(", ")
                )))
            }
        };
        Ok(Self::new(src, bos_token, eos_token))
    }

    fn env(&self) -> minijinja::Environment<'static> {
        let mut env = minijinja::Environment::new();
        // A model file's template is untrusted code: bounded in steps (a real template renders a
        // conversation in a few thousand) and, in `render`, in output.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        // Llama 3.x templates print today's date; a fixed date keeps prompts reproducible.
        env.add_function("strftime_now", |_fmt: String| "26 Jul 2024".to_string());
        env
    }

    /// Renders `messages`; with `add_generation_prompt`, ends with the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.env();
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| Error::Invalid(format!("chat template does not parse: {e}")))?;
        let mut out = Capped(Vec::new(), false);
        tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
            &mut out,
        )
        .map_err(|e| {
            let why = if out.1 { format!("the rendered prompt is over {} MB", MAX_RENDERED >> 20) } else { e.to_string() };
            Error::Invalid(format!("chat template failed: {why}"))
        })?;
        String::from_utf8(out.0).map_err(|_| Error::Invalid("chat template rendered invalid UTF-8".into()))
    }
}

/// Template steps one render may take.
const TEMPLATE_FUEL: u64 = 10_000_000;
/// Bytes one render may write (a prompt, not a book).
const MAX_RENDERED: usize = 16 << 20;

/// A buffer that refuses to grow past `MAX_RENDERED` (and says so in `.1`: the renderer's error
/// does not carry ours).
struct Capped(Vec<u8>, bool);

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > MAX_RENDERED {
            self.1 = true;
            return Err(std::io::Error::other("over the limit"));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm_template_matches_the_golden_prompt() {
        let t = ChatTemplate::new(SMOL, "<|im_start|>", "<|im_end|>");
        let out = t
            .render(&[Message::system("You are a helpful assistant."), Message::user("What is the capital of France?")], true)
            .unwrap();
        assert_eq!(out, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n");
        // Without a system message the template inserts its default one.
        let out = t.render(&[Message::user("hi")], false).unwrap();
        assert!(out.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
        assert!(out.ends_with("<|im_start|>user\nhi<|im_end|>\n"));
    }

    #[test]
    fn builtins_render_and_unknown_is_an_error() {
        for name in BUILTIN_NAMES {
            let t = ChatTemplate::builtin(name, "<s>", "</s>").unwrap();
            let out = t.render(&[Message::system("S"), Message::user("U")], true).unwrap();
            assert!(out.contains('U') && out.contains('S'), "{name}: {out}");
        }
        assert!(ChatTemplate::builtin("nope", "", "").is_err());
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip() }}{% if false %}{{ raise_exception('x') }}{% endif %}", "", "");
        assert_eq!(t.render(&[Message::user("  hi  ")], false).unwrap(), "hi");
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "");
        assert!(t.render(&[], false).unwrap_err().to_string().contains("roles must alternate"));
    }

    #[test]
    fn hostile_templates_stop() {
        // Endless work, and output that would fill the memory: errors, in well under a second.
        let t0 = std::time::Instant::now();
        let spin = ChatTemplate::new("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "", "");
        assert!(spin.render(&[], false).unwrap_err().to_string().contains("fuel"));
        let big = ChatTemplate::new("{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}", "", "");
        let e = big.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("over 16 MB"), "{e}");
        assert!(t0.elapsed().as_secs() < 30);
        // A long real conversation stays well inside both.
        let msgs: Vec<Message> = (0..500).map(|i| Message::user(format!("message {i} {}", "word ".repeat(100)))).collect();
        assert!(ChatTemplate::new(SMOL, "", "").render(&msgs, true).unwrap().len() > 250_000);
    }
}
