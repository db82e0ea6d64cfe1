//! A real headless Chromium, driven over the W3C WebDriver protocol through Debian's chromedriver:
//! what the console's browser tests click through. Installs `chromium` and `chromium-driver` (and a
//! CJK font) with apt when they are missing.
//!
//! The client is the dozen WebDriver commands the tests use, over reqwest (already in the tree).
//! fantoccini would bring second major versions of http, thiserror and cookie, and ICU's segmenter,
//! into a build on two cores.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::ports::free_port;

/// The W3C key of an element reference in WebDriver answers.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long a lookup waits for an element to appear.
const FIND_WITHIN: Duration = Duration::from_secs(10);

/// One browser session, and the chromedriver serving it (killed on drop).
pub struct Browser {
    _driver: Child,
    http: reqwest::Client,
    session: String,
}

/// Makes sure chromium and chromedriver are installed (apt-get, as CI does).
fn ensure_installed() -> anyhow::Result<()> {
    let present = |binary: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {binary}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if present("chromium") && present("chromedriver") {
        return Ok(());
    }
    eprintln!("installing chromium and chromium-driver (apt-get) for the browser tests");
    let status = std::process::Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "chromium",
            "chromium-driver",
            "fonts-wqy-microhei",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get to install chromium and chromium-driver")?;
    if !status.success() || !present("chromedriver") {
        bail!(
            "chromium and chromium-driver are needed for the browser tests: apt-get install chromium chromium-driver"
        );
    }
    Ok(())
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session.
    pub async fn start() -> anyhow::Result<Self> {
        ensure_installed()?;
        let port = free_port()?;
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromedriver")?;
        let http = conveyor_base::tls::http_client(None)
            .timeout(Duration::from_secs(60))
            .build()?;
        let base = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if ready.is_ok_and(|answer| answer.status().is_success()) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("chromedriver did not answer on port {port} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1000", "--lang=en-US"],
            },
        }}});
        let answer: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await?
            .json()
            .await?;
        let Some(session) = answer["value"]["sessionId"].as_str() else {
            bail!("chromedriver opened no session: {answer}");
        };
        Ok(Self {
            _driver: driver,
            http,
            session: format!("{base}/session/{session}"),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.session);
        let mut request = self.http.request(method, &url);
        if !body.is_null() {
            request = request.json(&body);
        }
        let answer: Value = request.send().await?.json().await?;
        if let Some(error) = answer["value"]["error"].as_str() {
            bail!(
                "WebDriver {path}: {error}: {}",
                answer["value"]["message"].as_str().unwrap_or_default()
            );
        }
        Ok(answer["value"].clone())
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, body).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, Value::Null).await
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.post("/url", json!({ "url": url })).await.map(drop)
    }

    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self
            .get("/url")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The element `css` selects, waiting for it to appear.
    async fn find(&self, css: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + FIND_WITHIN;
        loop {
            let found = self
                .post("/element", json!({"using": "css selector", "value": css}))
                .await;
            match found {
                Ok(element) => {
                    return element[ELEMENT_KEY]
                        .as_str()
                        .map(str::to_owned)
                        .with_context(|| format!("an element without a reference: {element}"));
                }
                Err(err) if tokio::time::Instant::now() > deadline => {
                    let url = self.current_url().await.unwrap_or_default();
                    return Err(err.context(format!("finding {css:?} on {url}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// How many elements `css` selects now.
    pub async fn count(&self, css: &str) -> anyhow::Result<usize> {
        let found = self
            .post("/elements", json!({"using": "css selector", "value": css}))
            .await?;
        Ok(found.as_array().map_or(0, Vec::len))
    }

    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let element = self.find(css).await?;
        Ok(self
            .get(&format!("/element/{element}/text"))
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let element = self.find(css).await?;
        self.post(
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await
        .map(drop)
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let element = self.find(css).await?;
        self.post(&format!("/element/{element}/click"), json!({}))
            .await
            .map(drop)
    }

    /// The page's HTML as the browser holds it now.
    pub async fn source(&self) -> anyhow::Result<String> {
        Ok(self
            .get("/source")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// A cookie's value (HttpOnly ones included: the driver sees them, scripts do not).
    pub async fn cookie(&self, name: &str) -> anyhow::Result<String> {
        let cookie = self.get(&format!("/cookie/{name}")).await?;
        Ok(cookie["value"].as_str().unwrap_or_default().to_owned())
    }

    /// Deletes every cookie (a new login follows).
    pub async fn forget_cookies(&self) -> anyhow::Result<()> {
        self.call(reqwest::Method::DELETE, "/cookie", Value::Null)
            .await
            .map(drop)
    }

    /// Saves a PNG screenshot of the viewport to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let encoded = self.get("/screenshot").await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .context("decoding a screenshot")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Ends the session (the browser exits; chromedriver is killed on drop).
    pub async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}
