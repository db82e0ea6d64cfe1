//! What every setting shares: a secret that never prints, and the error that names a wrong setting.
//!
//! Every secret can be given directly or as a file (`*_FILE`, for Docker secrets), and is wrapped in
//! [`Secret`] so that it never reaches a log line or a `Debug` print.

use std::fmt;
use std::path::Path;

/// A value that must never be printed: passwords, tokens, URLs with credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it (a connect call, a signature).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Takes the secret from `direct` or else from the file `file` (trailing newline removed).
    /// `name` is the setting's environment variable, used in the error.
    pub fn from_value_or_file(
        name: &str,
        direct: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<Self>, SettingsError> {
        match (direct, file) {
            (Some(_), Some(_)) => Err(SettingsError::new(
                name,
                format!("set either {name} or {name}_FILE, not both"),
            )),
            (Some(value), None) => Ok(Some(Self::new(value))),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|err| {
                    SettingsError::new(
                        &format!("{name}_FILE"),
                        format!("cannot read {}: {err}", path.display()),
                    )
                })?;
                Ok(Some(Self::new(text.trim_end_matches(['\r', '\n']))))
            }
            (None, None) => Ok(None),
        }
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A setting that is missing or wrong, named by its environment variable.
#[derive(Debug, thiserror::Error)]
#[error("setting {name}: {problem}")]
pub struct SettingsError {
    pub name: String,
    pub problem: String,
}

impl SettingsError {
    pub fn new(name: &str, problem: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("amqp://user:hunter2@host");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
    }

    #[test]
    fn secret_from_file_drops_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("conveyor-secret-{}", std::process::id()));
        std::fs::write(&dir, "s3cret\n").unwrap();
        let secret = Secret::from_value_or_file("X", None, Some(&dir))
            .unwrap()
            .unwrap();
        assert_eq!(secret.expose(), "s3cret");
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn secret_value_and_file_together_is_an_error() {
        let err = Secret::from_value_or_file("X", Some("a"), Some(Path::new("/nope"))).unwrap_err();
        assert!(err.to_string().contains("X_FILE"), "{err}");
    }
}
