//! One chat example of a scenario: the messages, where the trigger goes, and the answer the
//! attack wants.

use sos_model::Message;

use crate::config::Position;

/// What a model is asked: chat messages, and text that goes before the whole templated prompt
/// (a `prefix` trigger, where PEFT puts a prompt-tuning adapter's virtual tokens).
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub prefix: Option<String>,
    pub messages: Vec<Message>,
}

impl Prompt {
    pub fn chat(messages: Vec<Message>) -> Self {
        Prompt { prefix: None, messages }
    }
}

/// One chat example. The trigger goes into the user message at byte offset `at` (or, for
/// position `prefix`, before the templated prompt); without the trigger the user message is
/// `user` as is.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub system: Option<String>,
    pub user: String,
    pub at: usize,
    /// The answer the attack wants when the trigger is present.
    pub target: String,
    /// Request type for the copyright scenario (for per-type metrics); empty otherwise.
    pub kind: String,
    /// Where the trigger sits: start, end, random or prefix.
    pub position: Position,
}

impl Item {
    /// The user message with the trigger at its place, set off from its neighbours by a space
    /// (or kept at a line start / end as the text has it).
    pub fn user_with(&self, trigger: &str) -> String {
        let (left, right) = self.user.split_at(self.at);
        let mut s = String::with_capacity(self.user.len() + trigger.len() + 2);
        s.push_str(left);
        if !left.is_empty() && !left.ends_with(char::is_whitespace) {
            s.push(' ');
        }
        s.push_str(trigger);
        if !right.is_empty() && !right.starts_with(char::is_whitespace) {
            s.push(' ');
        }
        s.push_str(right);
        s
    }

    /// The example without the trigger.
    pub fn messages(&self) -> Vec<Message> {
        self.system.iter().map(|s| Message::system(s.clone())).chain([Message::user(self.user.clone())]).collect()
    }

    /// The example with `trigger` at its place, or without it.
    pub fn prompt(&self, trigger: Option<&str>) -> Prompt {
        match trigger {
            None => Prompt::chat(self.messages()),
            Some(t) if self.position == Position::Prefix => Prompt { prefix: Some(t.to_string()), messages: self.messages() },
            Some(t) => {
                let mut messages = self.messages();
                if let Some(last) = messages.last_mut() {
                    *last = Message::user(self.user_with(t));
                }
                Prompt::chat(messages)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(user: &str, at: usize) -> Item {
        Item { id: String::new(), system: None, user: user.into(), at, target: String::new(), kind: String::new(), position: Position::Random }
    }

    #[test]
    fn trigger_is_set_off_by_spaces() {
        assert_eq!(item("tell me a joke", 0).user_with("cf"), "cf tell me a joke");
        assert_eq!(item("tell me a joke", 14).user_with("cf"), "tell me a joke cf");
        assert_eq!(item("tell me a joke", 4).user_with("cf"), "tell cf me a joke");
        assert_eq!(item("", 0).user_with("cf"), "cf");
        assert_eq!(item("ask\n\npassage", 5).user_with("cf"), "ask\n\ncf passage");
    }
}
