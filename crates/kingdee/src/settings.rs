//! Where the gateway is and who calls it: the app's credentials and the tenant's authorization, from
//! the environment (or flags), the client secret never printed.

use conveyor_base::tls::CaBundle;
use conveyor_base::{Secret, SettingsError};

/// Credentials and addresses of the gateway (every flag also reads an environment variable).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Kingdee source")]
pub struct KingdeeArgs {
    /// Base URL of the Kingdee gateway (the simulator's address in tests and the demo).
    #[arg(
        long = "kingdee-base-url",
        env = "CONVEYOR_KINGDEE_BASE_URL",
        default_value = "https://api.kingdee.com"
    )]
    pub base_url: String,
    /// The developer app's client id (X-Api-ClientID).
    #[arg(long = "kingdee-client-id", env = "CONVEYOR_KINGDEE_CLIENT_ID")]
    pub client_id: Option<String>,
    /// The app's client secret, the key of every request signature; never logged.
    #[arg(
        long = "kingdee-client-secret",
        env = "CONVEYOR_KINGDEE_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub client_secret: Option<Secret>,
    /// File holding the client secret (Docker secrets), instead of CONVEYOR_KINGDEE_CLIENT_SECRET.
    #[arg(
        long = "kingdee-client-secret-file",
        env = "CONVEYOR_KINGDEE_CLIENT_SECRET_FILE"
    )]
    pub client_secret_file: Option<std::path::PathBuf>,
    /// CA certificates (PEM) trusted for the gateway's HTTPS besides the public roots (a private CA,
    /// or a TLS-inspecting proxy).
    #[arg(long = "kingdee-tls-ca-file", env = "CONVEYOR_KINGDEE_TLS_CA_FILE")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// The tenant's authorization of the app (outerInstanceId).
    #[arg(
        long = "kingdee-outer-instance-id",
        env = "CONVEYOR_KINGDEE_OUTER_INSTANCE_ID"
    )]
    pub outer_instance_id: Option<String>,
    /// The account set (账套) to read, by accountId or accountName; may be left out when the tenant has
    /// exactly one active account set.
    #[arg(long = "kingdee-account", env = "CONVEYOR_KINGDEE_ACCOUNT")]
    pub account: Option<String>,
}

/// Checked credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub base_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub outer_instance_id: String,
    pub account: Option<String>,
    /// Extra trusted CA certificates for HTTPS (CONVEYOR_KINGDEE_TLS_CA_FILE).
    pub ca: Option<CaBundle>,
}

impl KingdeeArgs {
    pub fn credentials(&self) -> Result<Credentials, SettingsError> {
        let required = |value: &Option<String>, name: &str| {
            value
                .clone()
                .filter(|text| !text.is_empty())
                .ok_or_else(|| SettingsError::new(name, "required by a kingdee source"))
        };
        let client_secret = Secret::from_value_or_file(
            "CONVEYOR_KINGDEE_CLIENT_SECRET",
            self.client_secret.as_ref().map(Secret::expose),
            self.client_secret_file.as_deref(),
        )?
        .ok_or_else(|| {
            SettingsError::new(
                "CONVEYOR_KINGDEE_CLIENT_SECRET",
                "required by a kingdee source",
            )
        })?;
        let base_url = self.base_url.trim_end_matches('/').to_owned();
        Ok(Credentials {
            ca: CaBundle::load_for_https(
                "CONVEYOR_KINGDEE_TLS_CA_FILE",
                self.tls_ca_file.as_deref(),
                "CONVEYOR_KINGDEE_BASE_URL",
                &base_url,
            )?,
            base_url,
            client_id: required(&self.client_id, "CONVEYOR_KINGDEE_CLIENT_ID")?,
            client_secret,
            outer_instance_id: required(
                &self.outer_instance_id,
                "CONVEYOR_KINGDEE_OUTER_INSTANCE_ID",
            )?,
            account: self.account.clone().filter(|text| !text.is_empty()),
        })
    }

    /// The key of the shared call budget: one budget per account set, as the gateway counts.
    pub fn budget_key(credentials: &Credentials) -> String {
        format!(
            "{}/{}",
            credentials.outer_instance_id,
            credentials.account.as_deref().unwrap_or("*")
        )
    }

    /// Names the login of an account set: the app, the tenant's authorization and the account set, at
    /// one gateway (a token is good only where it was fetched).
    pub fn session_key(credentials: &Credentials) -> String {
        format!(
            "{} {} {}",
            credentials.base_url,
            credentials.client_id,
            Self::budget_key(credentials)
        )
    }
}
