//! What an attempt must look like for the provider Envoy picked: its path (Azure names the
//! deployment in it), whether its body is translated between OpenAI chat completions and Anthropic
//! messages, and whether the client's content-length still holds.

use crate::config::{Config, Provider, ProviderType};
use crate::count::usage::ApiKind;

/// How an attempt's body must change for the provider Envoy picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    None,
    /// OpenAI chat completions client, Anthropic provider.
    ChatToMessages,
    /// Anthropic messages client, OpenAI-speaking provider.
    MessagesToChat,
}

pub fn translation(api: ApiKind, provider: ProviderType) -> Result<Translation, String> {
    match (api, provider.speaks_anthropic()) {
        // A path passed through (`passthrough_paths`) goes as the client wrote it, to a provider
        // that speaks the client's API.
        (ApiKind::Other, _) => Ok(Translation::None),
        (ApiKind::ChatCompletions, true) => Ok(Translation::ChatToMessages),
        (ApiKind::Messages, false) => Ok(Translation::MessagesToChat),
        (ApiKind::Messages, true) | (_, false) => Ok(Translation::None),
        (other, true) => Err(format!(
            "{} requests cannot be served by an Anthropic provider",
            match other {
                ApiKind::Completions => "legacy completions",
                ApiKind::Embeddings => "embeddings",
                ApiKind::Responses => "Responses API",
                _ => "these",
            }
        )),
    }
}

/// The path an attempt goes to: the provider's own endpoint for what the client asked.
/// `path` is the client's path (query kept for pass-through), `model` the provider's model name.
pub fn upstream_path(provider: &Provider, api: ApiKind, path: &str, model: Option<&str>) -> String {
    let base = provider.base_path.as_str();
    let endpoint = match (provider.kind, api) {
        (ProviderType::Anthropic, ApiKind::ChatCompletions | ApiKind::Messages) => "/v1/messages",
        (ProviderType::AzureOpenai, _) => {
            let op = match api {
                ApiKind::ChatCompletions | ApiKind::Messages => "chat/completions",
                ApiKind::Completions => "completions",
                ApiKind::Embeddings => "embeddings",
                _ => "",
            };
            if let (Some(m), false) = (model, op.is_empty()) {
                let v = provider.api_version.as_deref().unwrap_or("");
                return format!("{base}/openai/deployments/{m}/{op}?api-version={v}");
            }
            return format!("{base}{path}");
        }
        (_, ApiKind::Messages) => "/v1/chat/completions",
        _ => return format!("{base}{path}"),
    };
    format!("{base}{endpoint}")
}

/// One attempt's headers that depend on the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptPlan {
    /// The path (Azure names the deployment in it).
    pub path: String,
    /// The provider is called with another model name than the client's (a `models` map, an alias).
    pub remodel: bool,
    /// The body the provider gets is not the client's: its content-length must go.
    pub rewrites_body: bool,
}

/// [`AttemptPlan`] for provider `pi` (configuration order). Err when it does not serve the model.
pub fn attempt_plan(
    cfg: &Config,
    pi: usize,
    api: ApiKind,
    path: &str,
    client_model: Option<&str>,
    body_rewritten: bool,
) -> Result<AttemptPlan, String> {
    let Some(provider) = cfg.providers.get(pi) else {
        return Err("provider index out of range".into());
    };
    let provider_model = match client_model.filter(|m| !m.is_empty()) {
        Some(m) => Some(cfg.map_model(pi, m).ok_or_else(|| {
            format!(
                "The model '{m}' is not served by provider '{}'.",
                provider.name
            )
        })?),
        None => None,
    };
    let remodel = provider_model.is_some_and(|pm| Some(pm) != client_model);
    let rewrites_body = body_rewritten
        || remodel
        || translation(api, provider.kind)
            .map(|t| t != Translation::None)
            .unwrap_or(false);
    Ok(AttemptPlan {
        path: upstream_path(provider, api, path, provider_model),
        remodel,
        rewrites_body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, Config};
    use crate::pool::credentials::auth_headers;

    fn cfg(json: &str) -> Config {
        parse(json.as_bytes(), &|v| {
            (v == "K").then(|| "sk-secret".to_string())
        })
        .unwrap()
    }

    #[test]
    fn paths_per_provider() {
        let c = cfg(r#"{"providers":[
            {"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]},
            {"name":"az","type":"azure_openai","api_version":"2024-10-21","keys":[{"id":"k1","env":"K"}]},
            {"name":"an","type":"anthropic","keys":[{"id":"k1","env":"K"}]},
            {"name":"gq","type":"openai_compatible","base_path":"/openai","keys":[{"id":"k1","env":"K"}]}]}"#);
        let p = |i: usize| &c.providers[i];
        assert_eq!(
            upstream_path(
                p(0),
                ApiKind::ChatCompletions,
                "/v1/chat/completions",
                Some("m")
            ),
            "/v1/chat/completions"
        );
        assert_eq!(
            upstream_path(
                p(1),
                ApiKind::ChatCompletions,
                "/v1/chat/completions",
                Some("gpt-4o")
            ),
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            upstream_path(
                p(2),
                ApiKind::ChatCompletions,
                "/v1/chat/completions",
                Some("c")
            ),
            "/v1/messages"
        );
        assert_eq!(
            upstream_path(p(0), ApiKind::Messages, "/v1/messages", Some("m")),
            "/v1/chat/completions"
        );
        assert_eq!(
            upstream_path(p(3), ApiKind::ChatCompletions, "/v1/chat/completions", None),
            "/openai/v1/chat/completions"
        );
        assert_eq!(
            auth_headers(p(2), &p(2).keys[0]),
            vec![
                ("x-api-key", "sk-secret".to_string()),
                ("anthropic-version", "2023-06-01".to_string())
            ]
        );
        assert_eq!(
            auth_headers(p(1), &p(1).keys[0]),
            vec![("api-key", "sk-secret".to_string())]
        );
        assert!(translation(ApiKind::Embeddings, ProviderType::Anthropic).is_err());
        assert_eq!(
            translation(ApiKind::Other, ProviderType::Anthropic),
            Ok(Translation::None)
        );
    }

    #[test]
    fn an_alias_names_the_model_and_the_azure_deployment_per_provider() {
        let c = cfg(
            r#"{"aliases":{"fast":"gpt-4o-mini","smart":{"az":"gpt4o-prod","an":"claude-sonnet-4-5"}},"providers":[
            {"name":"oa","type":"openai","keys":[{"id":"k1","env":"K"}]},
            {"name":"az","type":"azure_openai","api_version":"2024-10-21","keys":[{"id":"k1","env":"K"}]},
            {"name":"an","type":"anthropic","keys":[{"id":"k1","env":"K"}],"models":{"gpt-4o-mini":"claude-haiku-4-5","claude-sonnet-4-5":"claude-sonnet-4-5"}}]}"#,
        );
        let plan = |pi, model| {
            attempt_plan(
                &c,
                pi,
                ApiKind::ChatCompletions,
                "/v1/chat/completions",
                Some(model),
                false,
            )
        };
        let p = plan(0, "fast").unwrap();
        assert_eq!(
            (p.path.as_str(), p.remodel, p.rewrites_body),
            ("/v1/chat/completions", true, true)
        );
        let p = plan(1, "fast").unwrap();
        assert_eq!(
            p.path,
            "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
        );
        let p = plan(1, "smart").unwrap();
        assert_eq!(
            p.path,
            "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
        );
        assert!(p.remodel);
        assert_eq!(
            plan(0, "smart").unwrap_err(),
            "The model 'smart' is not served by provider 'oa'."
        );
        let p = plan(0, "gpt-4o").unwrap();
        assert!(!p.remodel && !p.rewrites_body, "a model passed as it is");
        let p = plan(2, "claude-sonnet-4-5").unwrap();
        assert!(!p.remodel && p.rewrites_body, "translated, not renamed");
    }
}
