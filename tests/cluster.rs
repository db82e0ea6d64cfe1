//! The pipeline on a real three-node RabbitMQ cluster of the test's own (the machine's broker is not
//! touched): a node lost in the middle of a run loses nothing and doubles nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use conveyor_harness::own_cluster::OwnCluster;
use conveyor_harness::{Scenario, Services, Worker};

const TEST_LIMIT: Duration = Duration::from_secs(300);

async fn cluster_scenario(cluster: &OwnCluster, prefix: &str, orders_count: usize) -> Scenario {
    let services = Services {
        amqp_url: cluster.url(),
        amqp_tls: Default::default(),
        pg_url: services().await.pg_url,
    };
    // Small messages: many writes, so that the run is still going when the node dies.
    Scenario::start(
        services,
        &sales_orders_pipeline(),
        &bin_dir(),
        prefix,
        orders(orders_count),
        &[("records_per_message", toml::Value::Integer(20))],
    )
    .await
    .expect("scenario starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_leading_the_queues_killed_mid_run_loses_nothing() {
    within(TEST_LIMIT, leader_killed()).await;
}

async fn leader_killed() {
    let began = Instant::now();
    let mut cluster = OwnCluster::start(&format!("cluster-{}", std::process::id()), 3)
        .await
        .unwrap_or_else(|err| panic!("this test runs a RabbitMQ cluster of its own: {err:#}"));
    step(&format!("the cluster is up after {:?}", began.elapsed()));
    let scenario = cluster_scenario(&cluster, "cluster_kill", 3000).await;
    let mut workers = vec![
        spawn_ready(&scenario, Worker::Transformer).await,
        spawn_ready(&scenario, Worker::Writer).await,
        spawn_ready(&scenario, Worker::Writer).await,
    ];
    let queue = scenario.topology().queue(conveyor_base::Stage::Write);
    for stage in conveyor_base::Stage::ALL {
        let queue = scenario.topology().queue(stage);
        assert_eq!(
            cluster.members_of(&queue).await.unwrap(),
            3,
            "{queue} on every node"
        );
    }
    let leader = cluster.leader_of(&queue).await.unwrap();
    step(&format!("the write queue's leader is node {}", leader + 1));
    workers.push(scenario.spawn(Worker::Fetcher, &[]).unwrap());
    let client = conveyor_harness::pg_client(&scenario.services.pg_url)
        .await
        .unwrap();
    let total = scenario.expected_records().len();
    while scenario.target_count(&client).await.unwrap() < total / 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_kill = scenario.target_count(&client).await.unwrap();
    step(&format!(
        "{at_kill} of {total} written: killing node {}",
        leader + 1
    ));
    let killed = Instant::now();
    cluster.nodes[leader].kill().await;
    let mut first_write_after = None;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while first_write_after.is_none() {
        if scenario.target_count(&client).await.unwrap() > at_kill {
            first_write_after = Some(killed.elapsed());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing written after the node died\n{}",
            logs_of(&workers)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_target_equals_truth(&scenario, &workers).await;
    step(&format!(
        "the target equals the truth {:?} after the kill",
        killed.elapsed()
    ));
    eprintln!(
        "node killed with {at_kill} of {total} written; first write after it: {:?}",
        first_write_after.unwrap()
    );
    stop_all(&mut workers).await;
    // Queues of a cluster missing a member are deleted only after long timeouts: the node comes back
    // for the clean-up.
    cluster.nodes[leader].resume().await.unwrap();
    scenario.clean_up(false).await.unwrap();
}
