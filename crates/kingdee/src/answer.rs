//! What one answer of the gateway means: its data, or why not (retry, a rejected token, a moved
//! tenant, a stale secret, or a refusal that retrying cannot help), read from the HTTP status, the
//! envelope's codes and the body in one pass.

use std::time::Duration;

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;
use serde_json::value::RawValue;

/// The business-level code of a stale app_secret on the token call.
pub(crate) const STALE_SECRET: i64 = 1_030_002_006;

/// One outcome of one HTTP exchange.
pub(crate) enum Answer<T = Box<RawValue>> {
    /// The answer's `data`, read in the same pass as the rest of the answer.
    Data(T),
    /// Worth another try after a pause; counts as a failed try.
    Retry {
        reason: String,
    },
    /// The gateway's rate limit (HTTP 429, code 5007): wait and try again. Not a failed try: the call
    /// was refused for its timing, not for itself. `retry_after` is the wait the gateway asked for.
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
    TokenRejected {
        reason: String,
    },
    /// The gateway refuses the app's credentials or permissions (a wrong client id or secret, an API
    /// the app may not call): a setup error, for a human to fix; no call made as it is can succeed.
    Refused(String),
    TenantMoved,
    StaleSecret,
    Fatal(String),
}

/// Interprets an HTTP status, its `Retry-After` (read as seconds) and body; a successful answer's
/// `data` is read as `T`.
pub(crate) fn read_answer<T: DeserializeOwned>(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Answer<T> {
    let retry = |reason: String| Answer::Retry { reason };
    match status {
        429 => {
            return Answer::Throttled {
                reason: "HTTP 429: rate limited".into(),
                retry_after,
            };
        }
        502 => return Answer::TenantMoved,
        519 => {
            let code = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|json| code_of(&json))
                .unwrap_or(0);
            let reason = format!(
                "gateway refused the call: code {code}, {}",
                gateway_code_meaning(code)
            );
            return match code {
                4009..=4011 => Answer::TokenRejected { reason },
                4003 | 4005 | 4008 | 4012 => Answer::Refused(reason),
                5007 => Answer::Throttled {
                    reason,
                    retry_after,
                },
                4006 | 5003 | 5004 | 5006 => retry(reason),
                _ => Answer::Fatal(reason),
            };
        }
        500..=599 => return retry(format!("HTTP {status}")),
        200..=299 => {}
        404 => {
            return Answer::Fatal(
                "HTTP 404: no such API at this address (check the pipeline's source.path)".into(),
            );
        }
        _ => return Answer::Fatal(format!("HTTP {status}")),
    }
    match serde_json::from_slice::<Reply<T>>(body) {
        Ok(reply) => match reply.refusal() {
            Some(refusal) => refusal,
            None => match reply.data {
                Some(data) => Answer::Data(data),
                None => retry("answer has no data".into()),
            },
        },
        // A failed call's data is often not what a successful one's is: its code says which it was.
        Err(err) => match serde_json::from_slice::<Reply<IgnoredAny>>(body) {
            Ok(reply) => reply
                .refusal()
                .unwrap_or_else(|| retry(format!("unreadable data: {err}"))),
            Err(_) => retry(format!("unreadable answer: {err}")),
        },
    }
}

/// What a gateway code (of an HTTP 519) means, in words, with what to look at.
pub(crate) fn gateway_code_meaning(code: i64) -> &'static str {
    match code {
        4003 => "the client id is not known to the gateway (check CONVEYOR_KINGDEE_CLIENT_ID)",
        4005 => {
            "the client id and secret do not match (check CONVEYOR_KINGDEE_CLIENT_ID and \
             CONVEYOR_KINGDEE_CLIENT_SECRET)"
        }
        4006 => {
            "the request's timestamp is too far from the gateway's clock (is this machine's clock right?)"
        }
        4007 => "the signed headers are not the ones the gateway expects",
        4008 => {
            "the request's signature does not match: the client secret is wrong (check \
             CONVEYOR_KINGDEE_CLIENT_SECRET)"
        }
        4009 => "the call carried no app-token",
        4010 => "the app-token is not valid",
        4011 => "the app-token expired",
        4012 => {
            "the app has no permission for this API (grant it to the app in the Kingdee developer \
             portal, or check the pipeline's source.path)"
        }
        5001 => "no such API (check the pipeline's source.path)",
        5003 => "the API is unavailable for now",
        5004 => "the API timed out",
        5006 => "the gateway's circuit breaker for this API is open",
        5007 => "the gateway is overloaded (rate limit)",
        _ => "a gateway code this version does not know",
    }
}

/// The fields of an answer the client reads.
#[derive(Deserialize)]
struct Reply<T> {
    errcode: Option<Value>,
    code: Option<Value>,
    description: Option<Value>,
    msg: Option<Value>,
    data: Option<T>,
}

impl<D> Reply<D> {
    /// What the answer's code means when it is not a success; `None` for a success.
    fn refusal<T>(&self) -> Option<Answer<T>> {
        let retry = |reason: String| Some(Answer::Retry { reason });
        match code_in([self.errcode.as_ref(), self.code.as_ref()]) {
            Some(0 | 200) => None,
            Some(STALE_SECRET) => Some(Answer::StaleSecret),
            Some(2_000_002_000) => retry("business error 2000002000: system error".into()),
            Some(code) => {
                let description = [&self.description, &self.msg]
                    .into_iter()
                    .find_map(|text| text.as_ref()?.as_str())
                    .unwrap_or("");
                Some(Answer::Fatal(format!(
                    "business error {code}: {description}"
                )))
            }
            None => retry("answer has no errcode".into()),
        }
    }
}

/// The status code of an answer: `errcode` on business calls, `code` on some auth answers.
fn code_of(json: &Value) -> Option<i64> {
    code_in([json.get("errcode"), json.get("code")])
}

/// The first of `fields` that holds a code, as a number or numeric text.
fn code_in(fields: [Option<&Value>; 2]) -> Option<i64> {
    fields
        .into_iter()
        .flatten()
        .find_map(|code| code.as_i64().or_else(|| code.as_str()?.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        assert!(
            matches!(read_answer::<Box<RawValue>>(200, None, br#"{"errcode":0,"data":{"x":1}}"#), Answer::Data(d) if d.get() == r#"{"x":1}"#)
        );
        assert!(matches!(
            read_answer::<Box<RawValue>>(200, None, br#"{"code":200,"msg":"ok","data":[]}"#),
            Answer::Data(_)
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(429, Some(Duration::from_secs(3)), b""),
            Answer::Throttled {
                retry_after: Some(wait),
                ..
            } if wait == Duration::from_secs(3)
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(519, None, br#"{"code":4011}"#),
            Answer::TokenRejected { .. }
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(519, None, br#"{"errcode":"4010"}"#),
            Answer::TokenRejected { .. }
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(519, None, br#"{"code":4008}"#),
            Answer::Refused(reason) if reason.contains("client secret is wrong")
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(519, None, br#"{"code":4007}"#),
            Answer::Fatal(reason) if reason.contains("signed headers")
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(519, None, br#"{"code":5007}"#),
            Answer::Throttled {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(502, None, b""),
            Answer::TenantMoved
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(503, None, b""),
            Answer::Retry { .. }
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(200, None, br#"{"errcode":1030002006}"#),
            Answer::StaleSecret
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(200, None, br#"{"errcode":0,"data":{"#),
            Answer::Retry { .. }
        ));
        assert!(matches!(
            read_answer::<Box<RawValue>>(
                200,
                None,
                br#"{"errcode":1030002003,"description":"not found"}"#
            ),
            Answer::Fatal(_)
        ));
    }

    #[derive(Debug, Deserialize)]
    struct Rows {
        rows: Vec<u32>,
    }

    #[test]
    fn data_is_read_as_the_call_expects_and_refusals_still_read_with_other_data() {
        assert!(matches!(
            read_answer::<Rows>(200, None, br#"{"errcode":0,"data":{"rows":[1,2]}}"#),
            Answer::Data(Rows { rows }) if rows == [1, 2]
        ));
        assert!(matches!(
            read_answer::<Rows>(200, None, br#"{"errcode":0,"data":{"rows":"many"}}"#),
            Answer::Retry { reason, .. } if reason.starts_with("unreadable data")
        ));
        assert!(matches!(
            read_answer::<Rows>(200, None, br#"{"errcode":0,"data":null}"#),
            Answer::Retry { reason, .. } if reason == "answer has no data"
        ));
        // A business error whose data is not a list is still the business error.
        assert!(matches!(
            read_answer::<Rows>(200, None, br#"{"errcode":1030002003,"description":"not found","data":"x"}"#),
            Answer::Fatal(reason) if reason.contains("not found")
        ));
        assert!(matches!(
            read_answer::<Rows>(200, None, br#"{"errcode":1030002006,"data":{}}"#),
            Answer::StaleSecret
        ));
    }
}
