//! `summarize_then_answer`: two LLM calls. A long history is first condensed by the `summarizer`
//! LLM; the `answerer` then replies with the summary in its system prompt and only the last few
//! messages verbatim. Only the second call streams to the client. Short conversations skip the
//! first call.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use switchyard_core::{
    Chain, ChainContext, ChainDefinition, ChainError, ChainOutput, ChatRequest, Message,
};

/// `[config]` of `chain.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Messages passed to the answerer verbatim; older ones are summarized.
    pub keep_last: usize,
    #[serde(default)]
    pub summary_max_tokens: Option<u64>,
}

pub struct SummarizeThenAnswer {
    config: Config,
}

#[derive(Serialize)]
struct Turn {
    role: String,
    content: String,
}

#[derive(Serialize)]
struct CondenseVars {
    transcript: Vec<Turn>,
}

#[derive(Serialize)]
struct AnswerVars {
    summary: Option<String>,
}

impl ChainDefinition for SummarizeThenAnswer {
    const NAME: &'static str = "summarize_then_answer";
    const TEMPLATES: &'static [&'static str] = &["condense", "answer"];
    const LLMS: &'static [&'static str] = &["summarizer", "answerer"];
    type Config = Config;

    fn new(config: Config) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Chain for SummarizeThenAnswer {
    async fn invoke(
        &self,
        ctx: &ChainContext,
        request: ChatRequest,
    ) -> Result<ChainOutput, ChainError> {
        let conversation: Vec<&Message> = request
            .messages
            .iter()
            .filter(|m| m.role != "system")
            .collect();
        let split = conversation
            .len()
            .saturating_sub(self.config.keep_last.max(1));
        let (older, recent) = conversation.split_at(split);

        let mut summary_usage = None;
        let summary = if older.is_empty() {
            None
        } else {
            let transcript = older
                .iter()
                .map(|m| Turn {
                    role: m.role.clone(),
                    content: m.text(),
                })
                .collect();
            let prompt = ctx.render("condense", &CondenseVars { transcript })?;
            let mut call = ChatRequest::new(&request.model, vec![Message::user(prompt)]);
            call.max_tokens = self.config.summary_max_tokens;
            let condensed = ctx.llm("summarizer")?.chat(call).await?;
            summary_usage = condensed.usage.clone();
            Some(condensed.text())
        };

        let system = ctx.render("answer", &AnswerVars { summary })?;
        let mut messages = vec![Message::system(system)];
        messages.extend(recent.iter().map(|m| (*m).clone()));
        // `answer` carries the client's length cap and options over.
        let call = ChatRequest::new(&request.model, messages);
        let answer = ctx.llm("answerer")?.answer(call, &request).await?;
        // The usage (the response's, or the stream's usage chunk) covers both calls.
        Ok(match &summary_usage {
            Some(summary) => answer.add_usage(summary),
            None => answer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use switchyard_core::StreamOptions;
    use switchyard_providers::testkit::{ScriptedLlm, TestChain};

    fn long_conversation() -> Vec<Message> {
        vec![
            Message::system("client system prompt is dropped"),
            Message::user("I'm Ana, order 4411 is late."),
            Message::assistant("Sorry Ana, let me check order 4411."),
            Message::user("It was due Monday."),
            Message::assistant("It left the depot today."),
            Message::user("Can I still cancel?"),
            Message::assistant("Cancelling is possible before delivery."),
            Message::user("Then please tell me how."),
        ]
    }

    fn load(
        summarizer: &std::sync::Arc<ScriptedLlm>,
        answerer: &std::sync::Arc<ScriptedLlm>,
    ) -> TestChain {
        TestChain::load::<SummarizeThenAnswer>(&crate::chain_dir("summarize_then_answer"))
            .unwrap()
            .with_llm("summarizer", summarizer.clone())
            .with_llm("answerer", answerer.clone())
    }

    #[tokio::test]
    async fn condenses_the_older_history_then_answers_with_the_summary() {
        let summarizer = ScriptedLlm::new(["Ana: order 4411 late, due Monday, left depot today."]);
        let answerer = ScriptedLlm::new(["Use the Cancel button on the order page."]);
        let chain = load(&summarizer, &answerer);

        let reply = chain
            .chat(ChatRequest::new("e", long_conversation()))
            .await
            .unwrap();
        assert_eq!(reply.text(), "Use the Cancel button on the order page.");

        let condense = &summarizer.requests()[0];
        assert_eq!(condense.max_tokens, Some(200));
        assert_eq!(
            condense.messages[0].text(),
            "Condense the following conversation into a short summary that keeps every fact, name, \
             number and open question needed to continue it.\n\n\
             user: I'm Ana, order 4411 is late.\n\
             assistant: Sorry Ana, let me check order 4411.\n\
             user: It was due Monday.\n"
        );
        let answer = &answerer.requests()[0];
        assert!(answer.messages[0]
            .text()
            .contains("Summary of the earlier conversation:\nAna: order 4411 late, due Monday, left depot today."));
        let recent: Vec<String> = answer.messages[1..].iter().map(Message::text).collect();
        assert_eq!(
            recent,
            [
                "It left the depot today.",
                "Can I still cancel?",
                "Cancelling is possible before delivery.",
                "Then please tell me how."
            ]
        );
        // Usage covers both calls.
        let usage = reply.usage.unwrap();
        assert_eq!(
            usage.completion_tokens,
            13 + 9,
            "summary (13 tokens) + answer (9 tokens)"
        );
    }

    #[tokio::test]
    async fn a_short_conversation_is_answered_in_one_call() {
        let summarizer = ScriptedLlm::new(Vec::<String>::new());
        let answerer = ScriptedLlm::new(["Hello!"]);
        let chain = load(&summarizer, &answerer);
        let reply = chain
            .chat(ChatRequest::new("e", vec![Message::user("Hi")]))
            .await
            .unwrap();
        assert_eq!(reply.text(), "Hello!");
        assert!(summarizer.requests().is_empty());
        assert!(
            !answerer.requests()[0].messages[0]
                .text()
                .contains("Summary")
        );
    }

    #[tokio::test]
    async fn only_the_answer_streams() {
        let summarizer = ScriptedLlm::new(["short summary"]);
        let answerer = ScriptedLlm::new(["streamed answer here"]);
        let chain = load(&summarizer, &answerer);
        let mut request = ChatRequest::new("e", long_conversation());
        request.stream = Some(true);
        request.stream_options = Some(StreamOptions {
            include_usage: Some(true),
            ..StreamOptions::default()
        });
        let ChainOutput::Stream(stream) = chain.invoke(request).await.unwrap() else {
            panic!("expected a stream");
        };
        let chunks: Vec<_> = stream.map(Result::unwrap).collect().await;
        assert_eq!(
            chunks.iter().map(|c| c.text()).collect::<String>(),
            "streamed answer here"
        );
        assert_eq!(
            summarizer.requests()[0].stream,
            None,
            "the summary call does not stream"
        );
        assert_eq!(answerer.requests()[0].stream, Some(true));
        let usage = chunks.last().unwrap().usage.clone().unwrap();
        assert_eq!(usage.completion_tokens, 2 + 3, "summary + answer tokens");
    }

    #[tokio::test]
    async fn a_failed_summary_names_the_step() {
        let summarizer = ScriptedLlm::new(Vec::<String>::new());
        summarizer.push_error(switchyard_core::LlmError::new(
            switchyard_core::LlmErrorKind::Status {
                status: 503,
                retry_after: None,
            },
            "provider down",
        ));
        let answerer = ScriptedLlm::new(["unused"]);
        let chain = load(&summarizer, &answerer);
        let error = chain
            .chat(ChatRequest::new("e", long_conversation()))
            .await
            .unwrap_err();
        assert_eq!(error.step, "summarizer");
        assert!(answerer.requests().is_empty());
    }
}
