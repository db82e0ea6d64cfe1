//! What the target's answers and the transport's errors mean: the one place where they are sorted
//! into written, transient, unavailable or permanent, and how a write's calls add up.

use conveyor_base::tls;
use conveyor_pipeline::target::http::HttpErrorOverrides;
use reqwest::StatusCode;

use crate::target::{WriteError, WriteReport};

/// What one call did.
pub(super) enum Answer {
    Applied,
    /// 409: the target holds the record already.
    AlreadyThere,
}

/// Adds the answers of calls (each for a number of records) to a report. An unavailable target makes
/// the whole write unavailable (the breaker holds back); otherwise any transient failure makes it
/// transient (it is retried, and idempotence absorbs what already landed); otherwise any permanent one
/// makes it permanent, so that the writer finds the bad records one by one.
pub(super) fn merge(
    mut report: WriteReport,
    answers: Vec<(u64, Result<Answer, WriteError>)>,
) -> Result<WriteReport, WriteError> {
    let mut failure: Option<WriteError> = None;
    for (records, answer) in answers {
        match answer {
            Ok(Answer::Applied) => report.applied += records,
            Ok(Answer::AlreadyThere) => report.stale += records,
            Err(err) => {
                if failure
                    .as_ref()
                    .is_none_or(|worst| severity(&err) > severity(worst))
                {
                    failure = Some(err);
                }
            }
        }
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(report),
    }
}

/// How much a failure weighs when a write's calls fail differently: the heaviest decides.
pub(super) fn severity(err: &WriteError) -> u8 {
    match err {
        WriteError::Refused(_) => 3,
        WriteError::Unavailable(_) => 2,
        WriteError::Transient(_) => 1,
        WriteError::Permanent(_) => 0,
    }
}

/// What an answer other than a success means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// 409: the target holds the record already. Counts as written when the call was for one record;
    /// a batch answered so is split.
    Exists,
    /// The service says it cannot serve now ([`is_down`]: 429, 502, 503, 504): retry later. Calls
    /// answered so, or not at all, in a row make the target unavailable (the breaker holds back).
    Unavailable,
    /// This call failed for now (408, 425, 500 and other 5xx, the file's `transient`): retry later.
    Transient,
    /// Credentials refused: the writer holds back until they are accepted (they are the operator's
    /// to fix, never a reason to drop records), though the target itself serves.
    Credentials,
    /// The target refuses the data: dead-letter.
    Permanent,
}

/// The one place where the HTTP target's answers are sorted: the pipeline file's `[target.errors]`
/// say what is permanent or transient first; then 429, 502, 503 and 504 say the service is
/// unavailable; 409 that the record exists; 408, 425 and other 5xx are transient; 401 and 403 are
/// credentials; any other status means that the target refuses the data.
pub fn class_of(status: StatusCode, overrides: &HttpErrorOverrides) -> StatusClass {
    let code = status.as_u16();
    if overrides.permanent.contains(&code) {
        return StatusClass::Permanent;
    }
    if is_down(status) {
        return StatusClass::Unavailable;
    }
    if overrides.transient.contains(&code) {
        return StatusClass::Transient;
    }
    match status {
        StatusCode::CONFLICT => StatusClass::Exists,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => StatusClass::Credentials,
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY => StatusClass::Transient,
        status if status.is_server_error() => StatusClass::Transient,
        _ => StatusClass::Permanent,
    }
}

/// The error of an answer that is not a success, by [`class_of`]: transient, refused credentials, or
/// permanent (a 409 too, where it is not taken as "already exists").
pub fn classify_status(
    status: StatusCode,
    body: &str,
    overrides: &HttpErrorOverrides,
) -> WriteError {
    let body: String = body.chars().take(300).collect();
    let message = format!("target answered {status}: {}", body.trim());
    match class_of(status, overrides) {
        StatusClass::Unavailable | StatusClass::Transient => WriteError::Transient(message),
        StatusClass::Credentials => WriteError::Refused(format!(
            "{message} (check CONVEYOR_HTTP_TARGET_TOKEN, or the client id and secret, and what \
             they may do)"
        )),
        StatusClass::Exists | StatusClass::Permanent => WriteError::Permanent(message),
    }
}

/// Whether an answer says that the service is unavailable, so that the target counts as down when calls
/// get it one after another, and the breaker's probe keeps waiting: 429, 502, 503 and 504. Any other
/// answer, 404 or 500 included, means that something serves there (a 500 for some records must not
/// hold back the writing of the others).
pub fn is_down(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Sorts a transport error: a refused connection means the target is down altogether (the writer's
/// circuit breaker holds back at once); timeouts and anything else the client reports are transient,
/// since no answer about the data came back (and count towards `errors.unavailable_after`).
pub fn classify_error(what: &str, error: reqwest::Error) -> WriteError {
    let connect = error.is_connect() && !error.is_timeout();
    let kind = if error.is_timeout() {
        "timed out"
    } else if connect {
        "cannot connect"
    } else {
        "failed"
    };
    // Without the URL: it may carry credentials in its query.
    let error = error.without_url();
    let cause = match tls::tls_failure(&error) {
        Some(failure) => tls::advice(failure, "CONVEYOR_HTTP_TARGET_TLS_CA_FILE"),
        None => tls::error_chain(&error),
    };
    let message = format!("call to {what} {kind}: {cause}");
    if connect {
        WriteError::Unavailable(message)
    } else {
        WriteError::Transient(message)
    }
}
