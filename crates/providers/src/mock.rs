//! The built-in mock provider: deterministic, offline, honest about tokens.
//!
//! It answers with a fixed reply or echoes the last user message, as many choices as the request's
//! `n` asks for (each the same reply), streams the reply in a chosen number of chunks, and can
//! wait before answering. Token counts come from [`count_tokens`] over the real prompt and reply
//! text, so usage figures add up the way a real provider's do (completion tokens counted over
//! every choice).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream;
use serde::Deserialize;
use switchyard_core::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkStream, Delta, Llm, LlmError, Usage,
};

use switchyard_core::unix_now;

/// `[providers.<name>]` settings of a `kind = "mock"` provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Fixed reply text. Without it the mock echoes the last user message.
    #[serde(default)]
    pub reply: Option<String>,
    /// How many content chunks a streamed reply is cut into (at least 1).
    #[serde(default = "default_chunks")]
    pub chunks: usize,
    /// Wait this long before answering (before the first chunk of a stream).
    #[serde(default)]
    pub latency_ms: u64,
}

fn default_chunks() -> usize {
    4
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            reply: None,
            chunks: default_chunks(),
            latency_ms: 0,
        }
    }
}

/// A provider that needs no network.
#[derive(Debug)]
pub struct MockProvider {
    config: MockConfig,
    next_id: AtomicU64,
}

impl MockProvider {
    pub fn new(config: MockConfig) -> Self {
        Self {
            config,
            next_id: AtomicU64::new(1),
        }
    }

    /// The reply and its finish reason: cut to the request's `max_completion_tokens` (or
    /// `max_tokens`) and then `length`, as a real model stops.
    fn reply_for(&self, request: &ChatRequest) -> (String, &'static str) {
        let reply = match &self.config.reply {
            Some(reply) => reply.clone(),
            None => request
                .messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.text())
                .unwrap_or_default(),
        };
        let cap = request.max_completion_tokens.or(request.max_tokens);
        match cap.and_then(|cap| usize::try_from(cap).ok()) {
            Some(cap) if token_pieces(&reply).nth(cap).is_some() => {
                (token_pieces(&reply).take(cap).collect(), "length")
            }
            _ => (reply, "stop"),
        }
    }

    fn usage_for(request: &ChatRequest, reply: &str) -> Usage {
        let prompt = request
            .messages
            .iter()
            .map(|m| count_tokens(&m.text()))
            .sum();
        Usage::new(prompt, count_tokens(reply) * u64::from(choices(request)))
    }

    fn next_id(&self) -> String {
        format!(
            "chatcmpl-mock-{}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    async fn wait(&self) {
        if self.config.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.config.latency_ms)).await;
        }
    }
}

#[async_trait]
impl Llm for MockProvider {
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, LlmError> {
        self.wait().await;
        let (reply, finish) = self.reply_for(&request);
        let usage = Self::usage_for(&request, &reply);
        let n = choices(&request);
        let mut response =
            ChatResponse::assistant(self.next_id(), request.model, unix_now(), reply, usage);
        if let Some(choice) = response.choices.first_mut() {
            choice.finish_reason = Some(finish.to_owned());
            let first = choice.clone();
            response.choices.extend((1..n).map(|index| Choice {
                index,
                ..first.clone()
            }));
        }
        Ok(response)
    }

    async fn chat_stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        self.wait().await;
        let (reply, finish) = self.reply_for(&request);
        let usage = Self::usage_for(&request, &reply);
        let (id, model, created) = (self.next_id(), request.model.clone(), unix_now());
        let pieces = split_into_chunks(&reply, self.config.chunks);
        // One choice after the other, each chunk naming its choice's index.
        let mut chunks = Vec::new();
        for index in 0..choices(&request) {
            let chunk = |delta, finish| {
                let mut chunk = ChatChunk::delta(id.clone(), model.clone(), created, delta, finish);
                chunk.choices[0].index = index;
                chunk
            };
            chunks.push(chunk(Delta::role("assistant"), None));
            chunks.extend(
                pieces
                    .iter()
                    .map(|piece| chunk(Delta::content(piece.clone()), None)),
            );
            chunks.push(chunk(Delta::default(), Some(finish)));
        }
        if request.wants_stream_usage() {
            chunks.push(ChatChunk::usage(id.clone(), model.clone(), created, usage));
        }
        Ok(Box::pin(stream::iter(chunks.into_iter().map(Ok))))
    }
}

/// How many choices the mock answers with: the request's `n`, at most 128 (OpenAI's limit).
fn choices(request: &ChatRequest) -> u32 {
    u32::try_from(request.choices_asked().min(128)).unwrap_or(1)
}

/// The mock's tokenizer: a token is a run of letters/digits or one other non-space character.
/// Not any real model's tokenizer, but stable and proportional to the text.
pub fn count_tokens(text: &str) -> u64 {
    token_pieces(text).count() as u64
}

/// Splits text into pieces of one token each (with the whitespace before it), so that the
/// pieces concatenate back to the text exactly.
fn token_pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let start = rest.len() - rest.trim_start().len();
        let mut chars = rest[start..].char_indices();
        let (_, first) = chars.next()?;
        let end = if first.is_alphanumeric() {
            chars
                .find(|(_, c)| !c.is_alphanumeric())
                .map_or(rest.len(), |(i, _)| start + i)
        } else {
            start + first.len_utf8()
        };
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// Cuts `text` into `n` chunks (fewer if it has fewer tokens) along token boundaries (trailing whitespace stays with the
/// last chunk).
fn split_into_chunks(text: &str, n: usize) -> Vec<String> {
    let pieces: Vec<&str> = token_pieces(text).collect();
    let consumed: usize = pieces.iter().map(|p| p.len()).sum();
    let n = n.max(1).min(pieces.len());
    // Exactly `n` chunks of `len / n` pieces, the first `len % n` of them one piece longer.
    let mut chunks = Vec::with_capacity(n);
    let mut rest = &pieces[..];
    for i in 0..n {
        let size = pieces.len() / n + usize::from(i < pieces.len() % n);
        let (chunk, tail) = rest.split_at(size);
        chunks.push(chunk.concat());
        rest = tail;
    }
    let tail = &text[consumed..];
    match chunks.last_mut() {
        Some(last) => last.push_str(tail),
        None if !tail.is_empty() => chunks.push(tail.to_owned()),
        None => {}
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use switchyard_core::{Message, StreamOptions};

    /// Every chunk of the mock's stream for `request`.
    async fn stream_of(mock: &MockProvider, request: ChatRequest) -> Vec<ChatChunk> {
        let stream = mock.chat_stream(request).await.unwrap();
        stream.map(Result::unwrap).collect().await
    }

    #[test]
    fn counts_words_and_punctuation() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("Hello, world!"), 4);
        assert_eq!(count_tokens("  two   words  "), 2);
        assert_eq!(count_tokens("héllo wörld 42"), 3);
    }

    #[test]
    fn chunks_concatenate_back_to_the_text() {
        for text in ["", "one", "Hello, world! How are you today?  ", "  lead"] {
            for n in 1..6 {
                let chunks = split_into_chunks(text, n);
                assert_eq!(chunks.concat(), text, "text {text:?} n {n}");
                assert_eq!(
                    chunks.len(),
                    n.min(count_tokens(text) as usize),
                    "{text:?} {n}"
                );
            }
        }
        assert_eq!(split_into_chunks("a b c d", 2), vec!["a b", " c d"]);
        assert_eq!(split_into_chunks("a b c d e", 3), vec!["a b", " c d", " e"]);
    }

    #[tokio::test]
    async fn echoes_and_streams_with_usage() {
        let mock = MockProvider::new(MockConfig {
            chunks: 3,
            ..MockConfig::default()
        });
        let mut request = ChatRequest::new(
            "m",
            vec![
                Message::system("Be brief."),
                Message::user("Tell me a joke, please"),
            ],
        );
        let full = mock.chat(request.clone()).await.unwrap();
        assert_eq!(full.text(), "Tell me a joke, please");
        assert_eq!(full.usage, Some(Usage::new(9, 6)));

        request.stream = Some(true);
        request.stream_options = Some(StreamOptions {
            include_usage: Some(true),
            ..Default::default()
        });
        let chunks = stream_of(&mock, request).await;
        // role chunk, 3 content chunks, finish chunk, usage chunk
        assert_eq!(chunks.len(), 6);
        assert_eq!(
            chunks[0].choices[0].delta.role.as_deref(),
            Some("assistant")
        );
        let text: String = chunks.iter().map(ChatChunk::text).collect();
        assert_eq!(text, "Tell me a joke, please");
        assert_eq!(chunks[4].choices[0].finish_reason.as_deref(), Some("stop"));
        assert!(chunks[5].choices.is_empty());
        assert_eq!(chunks[5].usage, Some(Usage::new(9, 6)));
    }

    #[tokio::test]
    async fn answers_as_many_choices_as_n_asks_for() {
        let mock = MockProvider::new(MockConfig {
            reply: Some("Yes, twice".to_owned()),
            chunks: 2,
            ..MockConfig::default()
        });
        let mut request = ChatRequest::new("m", vec![Message::user("Again?")]);
        request.extra.insert("n".to_owned(), serde_json::json!(2));
        let full = mock.chat(request.clone()).await.unwrap();
        let choices: Vec<(u32, String)> = full
            .choices
            .iter()
            .map(|c| (c.index, c.message.text()))
            .collect();
        assert_eq!(
            choices,
            [(0, "Yes, twice".into()), (1, "Yes, twice".into())]
        );
        // Completion tokens over both choices: 3 each.
        assert_eq!(full.usage, Some(Usage::new(2, 6)));

        request.stream = Some(true);
        let chunks = stream_of(&mock, request).await;
        // Per choice: role chunk, 2 content chunks, finish chunk.
        let indexes: Vec<u32> = chunks.iter().map(|c| c.choices[0].index).collect();
        assert_eq!(indexes, [0, 0, 0, 0, 1, 1, 1, 1]);
        let finished = chunks.iter().fold(0, |set, c| set | c.finished_choices());
        assert_eq!(finished, 0b11);
        let second: String = chunks[4..]
            .iter()
            .map(|c| c.choices[0].delta.content.clone().unwrap_or_default())
            .collect();
        assert_eq!(second, "Yes, twice");
    }

    #[tokio::test]
    async fn stops_at_the_request_s_token_cap() {
        let mock = MockProvider::new(MockConfig::default());
        let mut request = ChatRequest::new("m", vec![Message::user("one, two three")]);
        request.max_completion_tokens = Some(3);
        let cut = mock.chat(request.clone()).await.unwrap();
        assert_eq!(cut.text(), "one, two");
        assert_eq!(cut.choices[0].finish_reason.as_deref(), Some("length"));
        assert_eq!(cut.usage.unwrap().completion_tokens, 3);
        request.max_completion_tokens = None;
        request.max_tokens = Some(4);
        let whole = mock.chat(request.clone()).await.unwrap();
        assert_eq!(whole.text(), "one, two three");
        assert_eq!(whole.choices[0].finish_reason.as_deref(), Some("stop"));

        request.max_tokens = Some(1);
        request.stream = Some(true);
        let chunks = stream_of(&mock, request).await;
        let text: String = chunks.iter().map(ChatChunk::text).collect();
        assert_eq!(text, "one");
        let last = chunks.last().unwrap();
        assert_eq!(last.choices[0].finish_reason.as_deref(), Some("length"));
    }
}
