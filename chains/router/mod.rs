//! `router`: a cheap classification call decides the topic (`{"topic": "billing"}` or
//! `{"topic": "technical"}`), then the conversation goes to that topic's prompt and LLM. A
//! classifier answer that is not valid JSON naming a known topic falls back to the default
//! topic instead of failing the request.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use switchyard_core::{
    Chain, ChainContext, ChainDefinition, ChainError, ChainOutput, ChatRequest, Message,
};
use tracing::info;

/// `[config]` of `chain.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub default_topic: Topic,
    #[serde(default = "default_classifier_max_tokens")]
    pub classifier_max_tokens: u64,
}

fn default_classifier_max_tokens() -> u64 {
    20
}

/// The branches. Each has a template and a logical LLM of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Topic {
    Billing,
    Technical,
}

impl Topic {
    const ALL: [Topic; 2] = [Topic::Billing, Topic::Technical];

    fn name(self) -> &'static str {
        match self {
            Topic::Billing => "billing",
            Topic::Technical => "technical",
        }
    }
}

pub struct Router {
    config: Config,
}

#[derive(Serialize)]
struct ClassifyVars<'a> {
    question: String,
    topics: Vec<&'a str>,
}

#[derive(Deserialize)]
struct Classification {
    topic: Topic,
}

impl ChainDefinition for Router {
    const NAME: &'static str = "router";
    const TEMPLATES: &'static [&'static str] = &["classify", "billing", "technical"];
    const LLMS: &'static [&'static str] = &["classifier", "billing", "technical"];
    type Config = Config;

    fn new(config: Config) -> Self {
        Self { config }
    }
}

/// Reads `{"topic": ...}` from the classifier's reply, tolerating a Markdown code fence.
fn parse_topic(reply: &str) -> Option<Topic> {
    let trimmed = reply.trim();
    let json = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str::<Classification>(json.trim())
        .ok()
        .map(|c| c.topic)
}

#[async_trait]
impl Chain for Router {
    async fn invoke(
        &self,
        ctx: &ChainContext,
        request: ChatRequest,
    ) -> Result<ChainOutput, ChainError> {
        let question = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(Message::text)
            .ok_or_else(|| {
                ChainError::invalid_request("classify", "the conversation has no user message")
            })?;
        let prompt = ctx.render(
            "classify",
            &ClassifyVars {
                question,
                topics: Topic::ALL.iter().map(|t| t.name()).collect(),
            },
        )?;
        let mut call = ChatRequest::new(&request.model, vec![Message::user(prompt)]);
        call.max_tokens = Some(self.config.classifier_max_tokens);
        let reply = ctx.llm("classifier")?.chat(call).await?.text();
        let topic = parse_topic(&reply).unwrap_or_else(|| {
            // The reply itself is model output about the user's message: it is not logged.
            info!(
                default = self.config.default_topic.name(),
                reply_chars = reply.len(),
                "classifier reply unusable; using the default topic"
            );
            self.config.default_topic
        });

        let system = ctx.render(topic.name(), &serde_json::json!({}))?;
        // `answer` carries the client's length cap and options over.
        let call = ChatRequest::new(&request.model, request.messages_with_system(system));
        ctx.llm(topic.name())?.answer(call, &request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use switchyard_providers::testkit::{ScriptedLlm, TestChain};

    struct Llms {
        classifier: Arc<ScriptedLlm>,
        billing: Arc<ScriptedLlm>,
        technical: Arc<ScriptedLlm>,
    }

    fn load(classifier_reply: &str) -> (TestChain, Llms) {
        let llms = Llms {
            classifier: ScriptedLlm::new([classifier_reply]),
            billing: ScriptedLlm::new(["Your invoice is attached."]),
            technical: ScriptedLlm::new(["1. Restart. 2. Retry."]),
        };
        let chain = TestChain::load::<Router>(&crate::chain_dir("router"))
            .unwrap()
            .with_llm("classifier", llms.classifier.clone())
            .with_llm("billing", llms.billing.clone())
            .with_llm("technical", llms.technical.clone());
        (chain, llms)
    }

    fn question() -> ChatRequest {
        ChatRequest::new("e", vec![Message::user("Why was I charged twice?")])
    }

    #[tokio::test]
    async fn dispatches_on_the_classifiers_topic() {
        let (chain, llms) = load(r#"{"topic": "billing"}"#);
        let reply = chain.chat(question()).await.unwrap();
        assert_eq!(reply.text(), "Your invoice is attached.");
        assert!(llms.technical.requests().is_empty());

        let classify = &llms.classifier.requests()[0];
        assert_eq!(classify.max_tokens, Some(20));
        assert_eq!(
            classify.messages[0].text(),
            "Classify the customer's message into exactly one topic: \"billing\" or \"technical\".\n\
             Reply with JSON only, like {\"topic\": \"billing\"}.\n\nMessage: Why was I charged twice?\n"
        );
        let billing = &llms.billing.requests()[0];
        assert!(
            billing.messages[0]
                .text()
                .starts_with("You are a billing specialist.")
        );
        assert_eq!(billing.messages[1].text(), "Why was I charged twice?");
    }

    #[tokio::test]
    async fn a_fenced_json_reply_is_understood() {
        let (chain, llms) = load("```json\n{\"topic\": \"technical\"}\n```");
        chain.chat(question()).await.unwrap();
        assert_eq!(llms.technical.requests().len(), 1);
        assert!(llms.billing.requests().is_empty());
    }

    #[tokio::test]
    async fn malformed_classifier_output_falls_back_to_the_default_topic() {
        for reply in ["billing", r#"{"topic": "sales"}"#, "{not json", ""] {
            let (chain, llms) = load(reply);
            let answer = chain.chat(question()).await.unwrap();
            assert_eq!(
                answer.text(),
                "1. Restart. 2. Retry.",
                "classifier said {reply:?}"
            );
            assert!(llms.billing.requests().is_empty());
        }
    }

    #[tokio::test]
    async fn a_conversation_without_a_user_message_is_an_invalid_request() {
        let (chain, _) = load("{}");
        let error = chain
            .chat(ChatRequest::new("e", vec![Message::assistant("hi")]))
            .await
            .unwrap_err();
        assert_eq!(error.step, "classify");
        assert!(matches!(
            error.kind,
            switchyard_core::ChainErrorKind::InvalidRequest(_)
        ));
    }
}
