//! The pipeline on a real three-node RabbitMQ cluster of the test's own (the machine's broker is not
//! touched), started once and put through one fault after another, each in the middle of a run with
//! two writers: a node stopped and started three times, two of three nodes lost for 15 s, the
//! writers' node frozen for 20 s, and the node leading the write queue killed for good. After each,
//! the target equals the truth: no id missing, none twice, every modify time the newest.

mod common;

use std::time::{Duration, Instant};

use common::*;
use conveyor_harness::own_cluster::OwnCluster;
use conveyor_harness::{Scenario, Services, Worker, WorkerProcess};

/// The four faults run one after another on the one cluster, each taking up to a minute or two.
const TEST_LIMIT: Duration = Duration::from_secs(900);

/// Short, so that the outage of two nodes (15 s) outlasts it and the workers are seen to hold their
/// work and say why.
const CONFIRM_TIMEOUT_SECS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_rides_out_node_faults_on_a_three_node_cluster() {
    within(TEST_LIMIT, async {
        let began = Instant::now();
        let mut cluster = OwnCluster::start(&format!("cluster-{}", std::process::id()), 3)
            .await
            .unwrap_or_else(|err| panic!("this test runs a RabbitMQ cluster of its own: {err:#}"));
        step(&format!("the cluster is up after {:?}", began.elapsed()));
        the_writers_node_frozen_for_20_s(&mut cluster).await;
        one_node_restarted_three_times(&mut cluster).await;
        two_of_three_nodes_lost_for_15_s(&mut cluster).await;
        the_node_leading_the_write_queue_killed(&mut cluster).await;
    })
    .await;
}

/// One run of the pipeline on the cluster: a transformer and two writers, then ([`Run::fetch`]) a
/// fetcher.
struct Run {
    scenario: Scenario,
    workers: Vec<WorkerProcess>,
    client: tokio_postgres::Client,
    total: usize,
}

/// How fast the source gives records.
enum Pace {
    /// As fast as the pipeline takes them: a few seconds for a few thousand.
    Full,
    /// About 50 records a second (two calls of 25), so that the run outlasts restarts of nodes.
    Slow,
}

impl Run {
    async fn start(cluster: &OwnCluster, prefix: &str, orders_count: usize, pace: Pace) -> Self {
        let services = Services {
            amqp_url: cluster.url(),
            amqp_tls: Default::default(),
            pg_url: services().await.pg_url,
        };
        // Small messages: many writes, so that the run is still going when a fault comes.
        let mut source = vec![("records_per_message", toml::Value::Integer(20))];
        if let Pace::Slow = pace {
            source.push(("page_size", toml::Value::Integer(25)));
            source.push(("calls_per_minute", toml::Value::Integer(120)));
        }
        let mut scenario = Scenario::start(
            services,
            &sales_orders_pipeline(),
            &bin_dir(),
            prefix,
            orders(orders_count),
            &source,
        )
        .await
        .expect("scenario starts");
        scenario.set_env(
            "CONVEYOR_AMQP_CONFIRM_TIMEOUT_SECS",
            CONFIRM_TIMEOUT_SECS.to_string(),
        );
        let workers = vec![
            spawn_ready(&scenario, Worker::Transformer).await,
            spawn_ready(&scenario, Worker::Writer).await,
            spawn_ready(&scenario, Worker::Writer).await,
        ];
        let client = conveyor_harness::pg_client(&scenario.services.pg_url)
            .await
            .unwrap();
        let total = scenario.expected_records().len();
        Self {
            scenario,
            workers,
            client,
            total,
        }
    }

    /// Starts the fetcher: the run begins.
    fn fetch(&mut self) {
        let fetcher = self.scenario.spawn(Worker::Fetcher, &[]).unwrap();
        self.workers.push(fetcher);
    }

    async fn written(&self) -> usize {
        self.scenario.target_count(&self.client).await.unwrap()
    }

    /// Waits until `count` records are in the target; the count then.
    async fn wait_written(&self, count: usize) -> usize {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let written = self.written().await;
            if written >= count {
                return written;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{written} of {count} records written after {TIMEOUT:?}\n{}",
                logs_of(&self.workers)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the first write past `count` records; the time from `since` to it.
    async fn first_write_after(&self, count: usize, since: Instant) -> Duration {
        self.wait_written(count + 1).await;
        since.elapsed()
    }

    /// What the workers' /readyz say now, one body each.
    async fn readiness(&self) -> Vec<String> {
        let mut said = Vec::new();
        for worker in &self.workers {
            let url = format!("http://{}/readyz", worker.http_addr);
            if let Ok(response) = http().get(url).send().await {
                said.push(response.text().await.unwrap_or_default());
            }
        }
        said
    }

    /// Requires the target to equal the truth, then stops the workers and removes the run's queues.
    async fn finish(mut self, fault: &str, since: Instant) {
        assert_target_equals_truth(&self.scenario, &self.workers).await;
        step(&format!(
            "{fault}: the target equals the truth {:?} after the fault began",
            since.elapsed()
        ));
        stop_all(&mut self.workers).await;
        // A node lost is handled: nothing for a human to look at.
        let errors = self.scenario.logged_errors();
        assert!(errors.is_empty(), "{fault}: {errors:#?}");
        self.scenario.clean_up(false).await.unwrap();
    }
}

async fn one_node_restarted_three_times(cluster: &mut OwnCluster) {
    let mut run = Run::start(cluster, "cluster_restarts", 3000, Pace::Slow).await;
    run.fetch();
    let began = Instant::now();
    let write_queue = run.scenario.topology().queue(conveyor_base::Stage::Write);
    for round in 1..=3 {
        let written = run.wait_written(run.total * round / 10).await;
        assert!(
            written < run.total,
            "the run ended before restart {round}: it is too quick for this test"
        );
        let node = cluster.leader_of(&write_queue).await.unwrap();
        step(&format!(
            "{written} of {} written: restart {round} of node {} (the write queue's leader)",
            run.total,
            node + 1
        ));
        let stopped = Instant::now();
        cluster.nodes[node].stop().await.unwrap();
        let stop_took = stopped.elapsed();
        let after = run.first_write_after(run.written().await, stopped).await;
        cluster.nodes[node].resume().await.unwrap();
        cluster.await_all_running().await.unwrap();
        eprintln!(
            "restart {round}: the node took {stop_took:?} to stop; first write after the stop began: {after:?}; back in the cluster {:?} after the stop",
            stopped.elapsed()
        );
    }
    run.finish("three restarts of one node", began).await;
}

async fn two_of_three_nodes_lost_for_15_s(cluster: &mut OwnCluster) {
    let mut run = Run::start(cluster, "cluster_majority", 1500, Pace::Slow).await;
    run.fetch();
    let written = run.wait_written(run.total / 10).await;
    let write_queue = run.scenario.topology().queue(conveyor_base::Stage::Write);
    let leader = cluster.leader_of(&write_queue).await.unwrap();
    let lost = [leader, (leader + 1) % 3];
    step(&format!(
        "{written} of {} written: killing nodes {} and {}, the write queue's leader among them",
        run.total,
        lost[0] + 1,
        lost[1] + 1
    ));
    let began = Instant::now();
    for node in lost {
        cluster.nodes[node].kill().await;
    }
    let mut said_why = None;
    while began.elapsed() < Duration::from_secs(15) {
        if said_why.is_none()
            && let Some(body) = run
                .readiness()
                .await
                .into_iter()
                .find(|body| body.contains("not confirmed"))
        {
            said_why = Some((began.elapsed(), body));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = run.written().await;
    let (seen_after, body) = said_why.unwrap_or_else(|| {
        panic!(
            "no worker's /readyz said why it held its work while the cluster had no majority\n{}",
            logs_of(&run.workers)
        )
    });
    step(&format!(
        "{during} written when the majority comes back; a worker's /readyz said why {seen_after:?} into the outage: {body}"
    ));
    let back = Instant::now();
    for node in lost {
        cluster.nodes[node].resume().await.unwrap();
    }
    cluster.await_all_running().await.unwrap();
    let nodes_back = back.elapsed();
    let after = run.first_write_after(run.written().await, back).await;
    eprintln!(
        "majority lost for 15 s: the nodes took {nodes_back:?} to start; first write after the restarts began: {after:?}"
    );
    run.finish("two of three nodes lost for 15 s", began).await;
}

async fn the_writers_node_frozen_for_20_s(cluster: &mut OwnCluster) {
    let mut run = Run::start(cluster, "cluster_freeze", 1500, Pace::Slow).await;
    run.fetch();
    let written = run.wait_written(run.total / 10).await;
    let writers_nodes = cluster
        .nodes_with_connections("conveyor-write:")
        .await
        .unwrap();
    let node = *writers_nodes.first().expect("the writers are connected");
    step(&format!(
        "{written} of {} written: freezing node {} (writers on nodes {writers_nodes:?}, from 0)",
        run.total,
        node + 1
    ));
    let began = Instant::now();
    cluster.nodes[node].freeze().unwrap();
    let writers: Vec<&WorkerProcess> = run
        .workers
        .iter()
        .filter(|worker| worker.worker == Worker::Writer)
        .collect();
    // A writer on the frozen node hears nothing from it, and leaves it after two heartbeats.
    let mut noticed = None;
    while began.elapsed() < Duration::from_secs(20) {
        if noticed.is_none() {
            for writer in &writers {
                let url = format!("http://{}/readyz", writer.http_addr);
                let ready = http()
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|response| response.status().is_success());
                if !ready {
                    noticed = Some(began.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noticed = noticed.unwrap_or_else(|| {
        panic!(
            "no writer left the frozen node within 20 s\n{}",
            logs_of(&run.workers)
        )
    });
    let during = run.written().await;
    cluster.nodes[node].thaw().unwrap();
    step(&format!(
        "thawed after 20 s: a writer left the frozen node {noticed:?} after the freeze; {during} written then"
    ));
    cluster.await_all_running().await.unwrap();
    eprintln!("node frozen for 20 s: a writer left it {noticed:?} after the freeze");
    run.finish("the writers' node frozen for 20 s", began).await;
}

async fn the_node_leading_the_write_queue_killed(cluster: &mut OwnCluster) {
    let mut run = Run::start(cluster, "cluster_kill", 3000, Pace::Full).await;
    let mut leaders = Vec::new();
    for queue in run.scenario.topology().queues() {
        assert_eq!(
            cluster.members_of(&queue).await.unwrap(),
            3,
            "{queue} on every node"
        );
        leaders.push(cluster.leader_of(&queue).await.unwrap());
    }
    let per_node: Vec<usize> = (0..3)
        .map(|node| leaders.iter().filter(|&&leader| leader == node).count())
        .collect();
    step(&format!(
        "the pipeline's queues lead on each node: {per_node:?}"
    ));
    assert!(
        per_node.iter().all(|&count| count > 0),
        "the queues' leaders are spread over the nodes: {per_node:?}"
    );
    let write_queue = run.scenario.topology().queue(conveyor_base::Stage::Write);
    let leader = cluster.leader_of(&write_queue).await.unwrap();
    run.fetch();
    let at_kill = run.wait_written(run.total / 4).await;
    step(&format!(
        "{at_kill} of {} written: killing node {}, the write queue's leader",
        run.total,
        leader + 1
    ));
    let killed = Instant::now();
    cluster.nodes[leader].kill().await;
    let after = run.first_write_after(at_kill, killed).await;
    eprintln!(
        "node killed with {at_kill} of {} written; first write after it: {after:?}",
        run.total
    );
    assert_target_equals_truth(&run.scenario, &run.workers).await;
    // Queues of a cluster missing a member are deleted only after long timeouts: the node comes back
    // for the clean-up.
    cluster.nodes[leader].resume().await.unwrap();
    run.finish("the write queue's leader killed", killed).await;
}
