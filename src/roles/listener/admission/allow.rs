//! The consumer's model allow-list (`consumers.list[].models`): a model the consumer may not use is
//! refused with 403, as OpenAI refuses a model a project may not use (`model_not_found`, "Project
//! ... does not have access to model ...") and Anthropic a permission (`permission_error`), and no
//! provider is called.
//!
//! The list is matched against the name the client wrote: an alias is allowed by its own name, and
//! allowing it allows neither the models it stands for nor the other way round. An operator moves
//! an alias to another model in one place, and each consumer's list still says whether that
//! consumer may use the alias, not which model serves it today.
//!
//! A request that names no model (or, passed through, none tollgate can read from a JSON body)
//! cannot be checked: a consumer with a list is refused it.

use super::{Admission, Incoming, Refusal, Stop};
use crate::api::errors::ErrorKind;

pub fn check(incoming: &Incoming<'_>, adm: &Admission) -> Result<(), Stop> {
    if !incoming.cfg.access.restricted {
        return Ok(());
    }
    let Some(allowed) = incoming
        .cfg
        .consumer(&adm.consumer)
        .and_then(|c| c.models.as_ref())
    else {
        return Ok(());
    };
    if !adm.model.is_empty() && allowed.matches(&adm.model) {
        return Ok(());
    }
    let msg = if adm.model.is_empty() {
        format!(
            "Consumer '{}' may use only some models, and this request names none. Allowed models: {}.",
            adm.consumer,
            allowed.shown()
        )
    } else {
        format!(
            "Consumer '{}' does not have access to model '{}'. Allowed models: {}.",
            adm.consumer,
            adm.model,
            allowed.shown()
        )
    };
    Err(Refusal::new(ErrorKind::PermissionDenied, msg)
        .code("model_not_found")
        .outcome("rejected_model")
        .into())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admission, config, incoming};
    use super::*;

    const CFG: &str = r#"{"aliases":{"fast":"gpt-4o-mini"},
        "consumers":{"list":[{"name":"narrow","key_env":"K","models":["gpt-4o-mini","claude-*","fast"]},
                             {"name":"wide","key_env":"K2"}]},
        "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#;

    fn refused(consumer: &str, body: &[u8]) -> Option<Refusal> {
        let cfg = config(CFG);
        let adm = admission(consumer, body);
        match check(&incoming(&cfg, body), &adm) {
            Ok(()) => None,
            Err(Stop::Refuse(r)) => Some(r),
            Err(Stop::Serve(_)) => panic!("served"),
        }
    }

    fn chat(model: &str) -> Vec<u8> {
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"x"}}]}}"#)
            .into_bytes()
    }

    #[test]
    fn a_listed_name_or_prefix_passes_and_any_other_model_is_refused_403_with_the_list() {
        for ok in ["gpt-4o-mini", "claude-haiku-4-5", "fast"] {
            assert_eq!(refused("narrow", &chat(ok)), None, "{ok}");
        }
        let r = refused("narrow", &chat("gpt-4o")).unwrap();
        assert_eq!(
            (r.kind, r.code, r.outcome, r.kind.status()),
            (
                ErrorKind::PermissionDenied,
                Some("model_not_found"),
                "rejected_model",
                403
            )
        );
        assert_eq!(
            r.message,
            "Consumer 'narrow' does not have access to model 'gpt-4o'. Allowed models: gpt-4o-mini, claude-*, fast."
        );
        assert_eq!(
            refused("wide", &chat("gpt-4o")),
            None,
            "a consumer without a list"
        );
    }

    #[test]
    fn a_request_naming_no_model_is_refused_to_a_restricted_consumer_only() {
        let body = br#"{"messages":[{"role":"user","content":"x"}]}"#;
        let r = refused("narrow", body).unwrap();
        assert_eq!(
            r.message,
            "Consumer 'narrow' may use only some models, and this request names none. Allowed models: gpt-4o-mini, claude-*, fast."
        );
        assert_eq!(refused("wide", body), None);
    }

    #[test]
    fn without_any_list_the_step_reads_nothing() {
        let cfg = config(
            r#"{"providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}]}]}"#,
        );
        let adm = admission("anyone-at-all", &chat("x"));
        assert!(check(&incoming(&cfg, b""), &adm).is_ok());
    }
}
