//! The model the client named, and the name it goes by in metrics and shared-data keys.
//!
//! Only models and aliases the configuration names anywhere are used as they are: any other becomes
//! "other", so that clients cannot grow the metric names or the shared-data keys without bound. An
//! alias goes by its own name here (what the client asked for); the model that served it is named
//! when the request is charged.

use super::{Admission, Incoming, Stop};
use crate::count::metric_segment;

pub fn check(incoming: &Incoming<'_>, adm: &mut Admission) -> Result<(), Stop> {
    adm.model = adm.info.model.clone().unwrap_or_default();
    adm.model_label = if adm.model.is_empty() {
        "none".into()
    } else if incoming.cfg.is_known_model(&adm.model) || incoming.cfg.aliases.contains(&adm.model) {
        metric_segment(&adm.model)
    } else {
        "other".into()
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admission, config, incoming};
    use super::*;

    const CFG: &str = r#"{"aliases":{"fast.one":"gpt-4o"},
        "providers":[{"name":"oa","type":"openai","keys":[{"id":"k","env":"K"}],
        "models":{"gpt-4o":"gpt-4o"}}]}"#;

    #[test]
    fn a_configured_model_keeps_its_name_and_any_other_is_other() {
        let cfg = config(CFG);
        for (body, label) in [
            (
                &br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}"#[..],
                "gpt-4o",
            ),
            (
                br#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
                "other",
            ),
            (br#"{"messages":[{"role":"user","content":"x"}]}"#, "none"),
            (
                br#"{"model":"fast.one","messages":[{"role":"user","content":"x"}]}"#,
                "fast_one",
            ),
        ] {
            let mut adm = admission("c", body);
            assert!(check(&incoming(&cfg, body), &mut adm).is_ok());
            assert_eq!(adm.model_label, label);
        }
    }
}
