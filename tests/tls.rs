//! TLS end to end, with a certificate authority made at test time: a pipeline whose broker is a real
//! RabbitMQ node speaking amqps:// with mutual TLS, whose source (the Kingdee simulator) and HTTP target
//! (the target simulator) are reached over HTTPS, ends equal to the truth; and workers that do not
//! trust the CA refuse to start, saying why, without printing the broker URL's password.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{bin_dir, repo_root, services, succeeded, within};
use conveyor_harness::own_broker::OwnBroker;
use conveyor_harness::tls::{TestPki, TlsProxy};
use conveyor_harness::{AmqpTlsFiles, Scenario, Services, Worker, WorkerProcess};
use kingdee_sim::SimConfig;
use target_sim::{TargetConfig, TargetSim};

const LIMIT: Duration = Duration::from_secs(90);
const COLLECTION: &str = "sales_order_lines";
const CLIENT_SECRET: &str = "tls-e2e-client-secret";

/// A name no other run uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn fresh_pki(name: &str) -> TestPki {
    let dir = std::env::temp_dir().join("conveyor-tls").join(unique(name));
    TestPki::generate(&dir).expect("a test CA and certificates")
}

/// The plain address of the simulator a scenario started.
fn sim_addr(scenario: &Scenario) -> SocketAddr {
    scenario
        .sim_url
        .trim_start_matches("http://")
        .parse()
        .expect("the simulator listens on a socket address")
}

fn log_of(worker: &WorkerProcess) -> String {
    std::fs::read_to_string(&worker.log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_mutual_tls_and_https_source_and_target_equal_the_truth() {
    within(LIMIT, amqps_and_https_steps()).await;
}

async fn amqps_and_https_steps() {
    let started = Instant::now();
    let pki = fresh_pki("e2e");
    let name = unique("tls");
    let broker = OwnBroker::start_with_tls(&name, &pki)
        .await
        .unwrap_or_else(|err| panic!("this test runs a RabbitMQ node of its own: {err:#}"));
    eprintln!("TLS broker up after {:?}", started.elapsed());
    let services = Services {
        amqp_url: broker.amqps_url().expect("a TLS listener"),
        amqp_tls: AmqpTlsFiles {
            ca_file: Some(pki.ca_file.clone()),
            cert_file: Some(pki.client_cert_file.clone()),
            key_file: Some(pki.client_key_file.clone()),
        },
        pg_url: services().await.pg_url,
    };
    let pipeline = repo_root().join("ops/pipelines/sales_order_lines_http.toml");
    let sim = SimConfig {
        seed: 23,
        orders: 300,
        ..SimConfig::default()
    };
    let mut scenario = Scenario::start(services, &pipeline, &bin_dir(), "tls", sim, &[])
        .await
        .expect("scenario starts");

    // The source over HTTPS, by the name its certificate carries.
    let source_proxy = TlsProxy::start(sim_addr(&scenario), &pki).await.unwrap();
    scenario.sim_url = format!("https://localhost:{}", source_proxy.addr().port());
    scenario.set_env(
        "CONVEYOR_KINGDEE_TLS_CA_FILE",
        pki.ca_file.display().to_string(),
    );

    // The HTTP target over HTTPS, with OAuth client credentials.
    let target = TargetSim::new(TargetConfig {
        key_field: "line_id".into(),
        version_field: Some("modified_at".into()),
        client: Some(("conveyor-tls".into(), CLIENT_SECRET.into())),
        ..TargetConfig::default()
    });
    let target_addr = target_sim::spawn(target.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let target_proxy = TlsProxy::start(target_addr, &pki).await.unwrap();
    let target_url = format!("https://localhost:{}", target_proxy.addr().port());
    let ca = pki.ca_file.display().to_string();
    let target_env = [
        ("CONVEYOR_HTTP_TARGET_URL", target_url.as_str()),
        ("CONVEYOR_HTTP_TARGET_TLS_CA_FILE", ca.as_str()),
        ("CONVEYOR_HTTP_TARGET_CLIENT_ID", "conveyor-tls"),
        ("CONVEYOR_HTTP_TARGET_CLIENT_SECRET", CLIENT_SECRET),
    ];

    scenario
        .declare_topology()
        .await
        .expect("the harness connects over amqps");
    // The broker requires a client certificate: the CA alone is not enough.
    let refused = std::process::Command::new(bin_dir().join("conveyorctl"))
        .args(["topology", "declare"])
        .arg(&scenario.pipeline.file)
        .env("CONVEYOR_NAMESPACE", &scenario.namespace)
        .env("CONVEYOR_AMQP_URL", scenario.services.amqp_url.expose())
        .env("CONVEYOR_AMQP_TLS_CA_FILE", &pki.ca_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "connected without a client certificate"
    );
    // With TLS 1.3 the broker refuses just after the handshake: an alert, or a reset when the alert is
    // lost on the way.
    assert!(
        stderr.contains("cannot connect to RabbitMQ at amqps://localhost")
            && (stderr.contains("CertificateRequired") || stderr.contains("reset")),
        "refused for the missing certificate: {stderr}"
    );
    assert!(
        !stderr.contains("guest:guest"),
        "the password was printed: {stderr}"
    );
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario
            .spawn_with_env(Worker::Writer, &[], &target_env)
            .unwrap(),
    ];
    scenario.run_fetcher_once(LIMIT).await.unwrap();

    let truth = scenario.expected_order_lines();
    assert!(truth.len() > 300, "{} lines", truth.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = target.records(COLLECTION);
        let equal = held.len() == truth.len()
            && truth.iter().all(|(id, version)| {
                held.get(id)
                    .and_then(|record| record["modified_at"].as_str())
                    == Some(version.as_str())
            });
        if equal {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target holds {} of {} lines\n--- transformer\n{}\n--- writer\n{}",
            held.len(),
            truth.len(),
            workers[0].log_tail(20),
            workers[1].log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A line from the middle of the client key's PEM: never to be printed.
    let key_pem = std::fs::read_to_string(&pki.client_key_file).unwrap();
    let key_body = key_pem.lines().nth(1).expect("a PEM body").to_owned();
    for worker in &workers {
        let log = log_of(worker);
        assert!(
            log.contains("amqps://localhost:"),
            "{} logs the broker it connected to:\n{}",
            worker.worker.binary(),
            worker.log_tail(20)
        );
        assert!(!log.contains(CLIENT_SECRET), "a secret reached a log");
        assert!(!log.contains(&key_body), "the client key reached a log");
    }
    conveyor_harness::stop_all(&mut workers).await.unwrap();
    scenario.clean_up(false).await.unwrap();
    let _ = std::fs::remove_dir_all(&pki.dir);
    eprintln!("done after {:?}", started.elapsed());
}

/// The shared broker's address (host:port), to put a TLS proxy in front of it.
fn shared_broker_addr(services: &Services) -> SocketAddr {
    use std::net::ToSocketAddrs as _;
    let shown = conveyor_amqp::endpoint(&services.amqp_url).unwrap();
    let first = shown.split(',').next().unwrap();
    let host_port = first
        .trim_start_matches("amqps://")
        .split('/')
        .next()
        .unwrap();
    host_port.to_socket_addrs().unwrap().next().unwrap()
}

/// A worker that does not trust the broker's CA exits at once, naming the problem and the setting,
/// and never printing the URL's password; with the CA, the same address works. The same for a
/// fetcher whose source's CA is missing. (The broker here is a TLS proxy in front of the shared
/// RabbitMQ: what the client checks is the certificate, whoever presents it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_workers_refuse_to_start_naming_the_tls_problem() {
    within(LIMIT, without_the_ca_steps()).await;
}

async fn without_the_ca_steps() {
    let started = Instant::now();
    let pki = fresh_pki("refused");
    let services = services().await;
    let proxy = TlsProxy::start(shared_broker_addr(&services), &pki)
        .await
        .unwrap();
    let port = proxy.addr().port();
    let password = "never-printed-5f2c9a";
    let scenario = common::scenario("tls_refused", common::orders(50)).await;

    // The broker's CA is missing: the transformer stops with the reason, before any AMQP login.
    let mut transformer = scenario
        .spawn_with_env(
            Worker::Transformer,
            &[],
            &[(
                "CONVEYOR_AMQP_URL",
                &format!("amqps://guest:{password}@localhost:{port}/%2f"),
            )],
        )
        .unwrap();
    assert_refused_at_start(&mut transformer, "CONVEYOR_AMQP_TLS_CA_FILE", password).await;

    // With the CA the same address works (conveyorctl shares the connect code).
    let pipeline_file = scenario.pipeline.file.to_str().unwrap();
    let declared = common::ctl_command(&scenario, &["topology", "declare", pipeline_file])
        .env(
            "CONVEYOR_AMQP_URL",
            format!("amqps://guest:guest@localhost:{port}/%2f"),
        )
        .env("CONVEYOR_AMQP_TLS_CA_FILE", &pki.ca_file)
        .output()
        .unwrap();
    succeeded("conveyorctl over amqps with the CA", declared);

    // The source's CA is missing: the fetcher (over the plain shared broker) stops at its start.
    let source_proxy = TlsProxy::start(sim_addr(&scenario), &pki).await.unwrap();
    let source_url = format!("https://localhost:{}", source_proxy.addr().port());
    let mut fetcher = scenario
        .spawn_with_env(
            Worker::Fetcher,
            &["--once"],
            &[("CONVEYOR_KINGDEE_BASE_URL", source_url.as_str())],
        )
        .unwrap();
    let client_secret = &scenario.simulator.config().gateway.client_secret;
    assert_refused_at_start(&mut fetcher, "CONVEYOR_KINGDEE_TLS_CA_FILE", client_secret).await;
    scenario.clean_up(false).await.unwrap();
    let _ = std::fs::remove_dir_all(&pki.dir);
    eprintln!("done after {:?}", started.elapsed());
}

/// The worker exits non-zero at once, its log naming the TLS problem and `setting`, never `secret`.
async fn assert_refused_at_start(worker: &mut WorkerProcess, setting: &str, secret: &str) {
    let status = worker.wait(Duration::from_secs(20)).await.unwrap();
    let log = log_of(worker);
    let binary = worker.worker.binary();
    assert!(!status.success(), "{binary} started untrusted:\n{log}");
    assert!(
        log.contains("unknown issuer") && log.contains(setting),
        "{binary}: the error names the TLS problem and {setting}:\n{log}"
    );
    assert!(!log.contains(secret), "{binary}: a secret reached the log");
}

#[test]
fn a_missing_ca_file_or_tls_files_with_a_plain_url_are_refused() {
    let missing = PathBuf::from("/nonexistent/conveyor-ca.pem");
    let output = std::process::Command::new(bin_dir().join("conveyorctl"))
        .args(["dlq", "list", "sales_orders"])
        .env(
            "CONVEYOR_AMQP_URL",
            "amqps://guest:guest@localhost:5671/%2f",
        )
        .env("CONVEYOR_AMQP_TLS_CA_FILE", &missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("CONVEYOR_AMQP_TLS_CA_FILE") && stderr.contains("cannot read"),
        "{stderr}"
    );

    // TLS files with a plain amqp:// URL: the operator expects encryption that would not happen.
    let pki = fresh_pki("plain");
    let output = std::process::Command::new(bin_dir().join("conveyorctl"))
        .args(["dlq", "list", "sales_orders"])
        .env("CONVEYOR_AMQP_URL", "amqp://guest:guest@localhost:5672/%2f")
        .env("CONVEYOR_AMQP_TLS_CA_FILE", &pki.ca_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("CONVEYOR_AMQP_URL") && stderr.contains("not amqps://"),
        "{stderr}"
    );
    // The same for the source: a CA file with an http:// gateway.
    let output = std::process::Command::new(bin_dir().join("conveyorctl"))
        .args(["kingdee", "token"])
        .env("CONVEYOR_KINGDEE_BASE_URL", "http://127.0.0.1:9")
        .env("CONVEYOR_KINGDEE_CLIENT_ID", "id")
        .env("CONVEYOR_KINGDEE_CLIENT_SECRET", "secret")
        .env("CONVEYOR_KINGDEE_OUTER_INSTANCE_ID", "instance")
        .env("CONVEYOR_KINGDEE_TLS_CA_FILE", &pki.ca_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("CONVEYOR_KINGDEE_BASE_URL") && stderr.contains("not https://"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}
