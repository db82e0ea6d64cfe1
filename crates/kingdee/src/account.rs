//! The account sets (账套) an app is authorized for, and the choice of the one to sync.

use serde::Deserialize;
use serde_json::Value;

/// One account set (账套) in push_app_authorize's answer (no `Debug`: it holds the app_secret).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AccountSet {
    pub(crate) app_key: String,
    pub(crate) app_secret: String,
    pub(crate) domain: String,
    #[serde(default)]
    pub(crate) account_id: String,
    #[serde(default)]
    pub(crate) account_name: String,
    #[serde(default)]
    pub(crate) status: Value,
}

impl AccountSet {
    fn active(&self) -> bool {
        self.status == 1 || self.status == "1"
    }

    fn named(&self, wanted: &str) -> bool {
        self.account_id == wanted || self.account_name == wanted
    }
}

/// The account set to use: the active one named `wanted` (by accountId or accountName), or the only
/// active one when none is named. The error says what the tenant has, for the operator to choose.
pub(crate) fn choose_account<'a>(
    sets: &'a [AccountSet],
    wanted: Option<&str>,
) -> Result<&'a AccountSet, String> {
    let active: Vec<&AccountSet> = sets.iter().filter(|set| set.active()).collect();
    let listed = active
        .iter()
        .map(|set| format!("{:?} (accountId {})", set.account_name, set.account_id))
        .collect::<Vec<_>>()
        .join(", ");
    match wanted {
        Some(wanted) => {
            if let Some(set) = active.iter().find(|set| set.named(wanted)) {
                return Ok(set);
            }
            let state = if sets.iter().any(|set| set.named(wanted)) {
                "is inactive (status 0)"
            } else {
                "is not among the tenant's account sets"
            };
            Err(format!(
                "account set {wanted:?} named by CONVEYOR_KINGDEE_ACCOUNT {state}; the active ones: {}",
                if listed.is_empty() { "none" } else { &listed }
            ))
        }
        None => match active.as_slice() {
            [only] => Ok(only),
            [] => Err("the tenant has no active account set for this app".into()),
            _ => Err(format!(
                "the tenant has {} active account sets: {listed}; name one with CONVEYOR_KINGDEE_ACCOUNT",
                active.len()
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account_sets() -> Vec<AccountSet> {
        serde_json::from_value(serde_json::json!([
            {"appKey": "k0", "appSecret": "s0", "domain": "d", "accountId": "100", "accountName": "归档账套", "status": 0},
            {"appKey": "k1", "appSecret": "s1", "domain": "d", "accountId": "101", "accountName": "华东账套", "status": 1},
            {"appKey": "k2", "appSecret": "s2", "domain": "d", "accountId": "102", "accountName": "华南账套", "status": "1"},
        ]))
        .unwrap()
    }

    #[test]
    fn the_named_account_set_is_chosen_by_name_or_id() {
        let sets = account_sets();
        assert_eq!(
            choose_account(&sets, Some("华南账套")).unwrap().app_key,
            "k2"
        );
        assert_eq!(choose_account(&sets, Some("101")).unwrap().app_key, "k1");
        assert_eq!(choose_account(&sets[..2], None).unwrap().app_key, "k1");
    }

    #[test]
    fn an_account_set_that_cannot_be_used_is_refused_with_the_choices() {
        let sets = account_sets();
        let missing = choose_account(&sets, Some("西北账套")).err().unwrap();
        assert!(
            missing.contains("\"西北账套\" named by CONVEYOR_KINGDEE_ACCOUNT is not among")
                && missing.contains("\"华东账套\" (accountId 101), \"华南账套\" (accountId 102)"),
            "{missing}"
        );
        let inactive = choose_account(&sets, Some("归档账套")).err().unwrap();
        assert!(inactive.contains("is inactive"), "{inactive}");
        let unnamed = choose_account(&sets, None).err().unwrap();
        assert!(
            unnamed.contains("2 active account sets")
                && unnamed.contains("CONVEYOR_KINGDEE_ACCOUNT"),
            "{unnamed}"
        );
        assert!(choose_account(&sets[..1], None).is_err());
    }
}
