//! What operators rely on: the compose file, metrics, and traces across the
//! services.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::time::Duration;

use compose_spec::Compose;
use compose_spec::service::{Command as ComposeCommand, Healthcheck};
use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_tests::processes::ProcessStack;
use inmail_tests::redis_server::free_port;
use inmail_tests::{As, messaging_at, plans_at, rid};

use crate::common::*;

/// Every environment variable a binary reads (its clap definition), and the
/// flag that reads it.
fn accepted_variables(command: &clap::Command) -> HashMap<String, String> {
    command
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy().into_owned();
            Some((env, format!("--{}", arg.get_long()?)))
        })
        .collect()
}

fn cli_of(binary: &str) -> clap::Command {
    match binary {
        "subscription-plan" => inmail_shared::runtime::cli::command::<subscription_plan::Service>(),
        "billing-credits" => inmail_shared::runtime::cli::command::<billing_credits::Service>(),
        "messaging" => inmail_shared::runtime::cli::command::<messaging::Service>(),
        other => panic!("docker-compose.yml runs an unknown binary {other:?}"),
    }
}

/// The compose file parses and validates with a real Compose-spec parser,
/// every variable it sets is one the binary accepts, and every value is one
/// the binary would take.
#[test]
fn compose_file_is_valid_and_sets_only_variables_the_binaries_accept() {
    let yaml = include_str!("../../../docker-compose.yml");
    let compose = Compose::options()
        .apply_merge(true)
        .from_yaml_str(yaml)
        .expect("docker-compose.yml is not a valid Compose file");
    compose
        .validate_all()
        .expect("docker-compose.yml refers to undefined resources");

    let mut binaries = BTreeSet::new();
    for (name, service) in &compose.services {
        if name.as_str() == "secrets" {
            let Some(ComposeCommand::List(command)) = &service.command else {
                panic!("secrets has no command list");
            };
            assert_eq!(command[..2], ["messaging", "dev-pki"], "{command:?}");
            let cli = cli_of("messaging");
            cli.clone()
                .try_get_matches_from(command)
                .unwrap_or_else(|e| panic!("secrets: messaging refuses {command:?}: {e}"));
            continue;
        }
        let depends = format!("{:?}", service.depends_on);
        assert!(
            depends.contains("secrets") && depends.contains("ServiceCompletedSuccessfully"),
            "{name} may start before its secrets exist: {depends}"
        );
        if name.as_str() == "redis" {
            let redis = format!("{:?}", service.command);
            for setting in ["appendonly", "always", "noeviction", "--aclfile"] {
                assert!(
                    redis.contains(setting),
                    "Redis runs without {setting}: {redis}"
                );
            }
            assert!(
                !service.volumes.is_empty(),
                "Redis keeps its AOF on a volume"
            );
            continue;
        }
        if name.as_str() == "postgres" {
            // A pinned image, a health check, its data on a volume, and the
            // passwords from files (never in the compose file).
            let image = format!("{:?}", service.image);
            assert!(
                image.contains("postgres:") && image.chars().any(|c| c.is_ascii_digit()),
                "PostgreSQL's image is not pinned: {image}"
            );
            assert!(
                service.healthcheck.is_some(),
                "PostgreSQL has no health check"
            );
            let volumes = format!("{:?}", service.volumes);
            assert!(
                volumes.contains("/var/lib/postgresql/data"),
                "PostgreSQL keeps its data on a volume: {volumes}"
            );
            let environment = format!("{:?}", service.environment);
            assert!(
                environment.contains("POSTGRES_PASSWORD_FILE")
                    && !environment.contains("\"POSTGRES_PASSWORD\""),
                "PostgreSQL's password comes from a file: {environment}"
            );
            continue;
        }
        let Some(ComposeCommand::List(command)) = &service.command else {
            panic!("{name} has no command list");
        };
        let binary = command[0].as_str();
        binaries.insert(binary.to_string());
        let cli = cli_of(binary);
        let accepted = accepted_variables(&cli);
        let environment = service
            .environment
            .clone()
            .into_map()
            .expect("environment is a map");
        // Secured: its own identity, its own Redis user, other services
        // over TLS, no test clock.
        let setting = |key: &str| {
            environment
                .iter()
                .find(|(k, _)| k.as_str() == key)
                .and_then(|(_, v)| v.as_ref().map(|v| v.to_string()))
        };
        for (key, expected) in [
            ("TLS_CERT_FILE", format!("{name}.crt")),
            ("TLS_KEY_FILE", format!("{name}.key")),
            ("TLS_CA_FILE", "ca.crt".to_string()),
            ("JWT_PUBLIC_KEYS_FILE", "jwks.json".to_string()),
            ("REDIS_PASSWORD_FILE", format!("redis-{name}.password")),
        ] {
            let value = setting(key).unwrap_or_else(|| panic!("{name} does not set {key}"));
            assert!(value.ends_with(&expected), "{name}: {key}={value}");
        }
        assert_eq!(setting("REDIS_USERNAME").as_deref(), Some(name.as_str()));
        // The services that keep history reach PostgreSQL as their own user,
        // the password from its file.
        if inmail_shared::runtime::auth::devpki::HISTORY_SERVICES.contains(&name.as_str()) {
            let url = setting("DATABASE_URL").unwrap_or_else(|| panic!("{name}: no DATABASE_URL"));
            let user = url
                .strip_prefix("postgres://")
                .and_then(|rest| rest.split_once('@'))
                .map(|(user, _)| user)
                .unwrap_or_else(|| panic!("{name}: DATABASE_URL {url} names no user"));
            assert!(
                !user.contains(':'),
                "{name}: DATABASE_URL carries a password"
            );
            let file = setting("DATABASE_PASSWORD_FILE")
                .unwrap_or_else(|| panic!("{name}: no DATABASE_PASSWORD_FILE"));
            assert!(
                file.ends_with(&format!("postgres-{name}.password")),
                "{name}: {file}"
            );
        }
        for key in [
            "INSECURE_PLAINTEXT",
            "TEST_CLOCK",
            "TEST_CLOCK_UNSAFE_ALLOW_REMOTE",
        ] {
            assert!(setting(key).is_none(), "{name} sets {key}");
        }
        for key in ["SUBSCRIPTION_PLAN_URL", "BILLING_CREDITS_URL"] {
            if let Some(url) = setting(key) {
                assert!(url.starts_with("https://"), "{name}: {key}={url}");
            }
        }
        let ports = format!("{:?}", service.ports);
        assert!(
            ports.matches("127.0.0.1").count() == service.ports.len(),
            "{name} publishes ports beyond this host's loopback: {ports}"
        );
        let mut args = vec![binary.to_string()];
        for (key, value) in environment {
            let key = key.to_string();
            let flag = accepted
                .get(&key)
                .unwrap_or_else(|| panic!("{name}: {binary} does not read {key}"));
            args.push(flag.clone());
            args.push(value.map(|v| v.to_string()).unwrap_or_default());
        }
        cli.clone()
            .try_get_matches_from(&args)
            .unwrap_or_else(|e| panic!("{name}: {binary} refuses its compose settings: {e}"));

        let health = format!("{:?}", service.healthcheck);
        assert!(
            matches!(service.healthcheck, Some(Healthcheck::Command(_)))
                && health.contains("healthcheck"),
            "{name} is not health-checked with `{binary} healthcheck`: {health}"
        );
        let depends = format!("{:?}", service.depends_on);
        assert!(
            depends.contains("ServiceHealthy"),
            "{name} starts before its dependencies are healthy: {depends}"
        );
        assert!(service.restart.is_some(), "{name} has no restart policy");
        assert!(
            !service.ports.is_empty(),
            "{name} publishes no port for grpcurl"
        );
    }
    assert_eq!(
        binaries.into_iter().collect::<Vec<_>>(),
        ["billing-credits", "messaging", "subscription-plan"]
    );
}

fn http_get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

async fn process_stack_with(
    extra: Vec<(&'static str, String)>,
) -> (ProcessStack, HashMap<&'static str, String>) {
    let metrics: HashMap<&'static str, String> =
        ["subscription-plan", "billing-credits", "messaging"]
            .into_iter()
            .map(|name| (name, format!("127.0.0.1:{}", free_port())))
            .collect();
    let per_service = metrics.clone();
    let stack = ProcessStack::start(move |name| {
        let mut env = vec![("METRICS_ADDR".to_string(), per_service[name].clone())];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        env
    })
    .await;
    (stack, metrics)
}

async fn subscribe_process(stack: &ProcessStack, member: &str) {
    plans_at(stack.plans.addr, &As::member(member))
        .subscribe(plans::SubscribeRequest {
            request_id: rid(),
            member_id: member.into(),
            plan_id: "premium-career".into(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoints_answer_with_the_named_series_after_messages() {
    let (stack, metrics) = process_stack_with(vec![]).await;
    subscribe_process(&stack, "mia").await;
    let mut client = messaging_at(stack.messaging.addr, &As::member("mia"));
    for i in 0..3 {
        client
            .send_message(send_request("mia", &format!("lead{i}"), "Hi", "Hello"))
            .await
            .unwrap();
    }
    messaging_at(stack.messaging.addr, &As::member("lead0"))
        .respond_to_inmail(pb::RespondToInmailRequest {
            request_id: rid(),
            member_id: "lead0".into(),
            conversation_id: "lead0~mia".into(),
            response: pb::InmailResponse::Accept as i32,
            body: String::new(),
        })
        .await
        .unwrap();
    let messaging = http_get(&metrics["messaging"], "/metrics");
    for series in [
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handled_total",
        "inmail_messages_sent_total",
        "inmail_credits_charged_total",
        "inmail_refunds_total",
    ] {
        assert!(
            messaging.contains(series),
            "messaging metrics lack {series}:\n{messaging}"
        );
    }
    assert!(messaging.contains(r#"method="/inmail.messaging.v1.MessagingService/SendMessage""#));
    assert!(messaging.contains(r#"code="Ok""#));
    let billing = http_get(&metrics["billing-credits"], "/metrics");
    for series in [
        "inmail_credits_debited_total",
        "inmail_credits_refunded_total",
        "inmail_credits_renewed_total",
        "grpc_server_handling_seconds",
    ] {
        assert!(
            billing.contains(series),
            "billing metrics lack {series}:\n{billing}"
        );
    }
    let debited = billing
        .lines()
        .find(|l| l.starts_with("inmail_credits_debited_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(debited, Some(3.0));
    let plans = http_get(&metrics["subscription-plan"], "/metrics");
    assert!(plans.contains("GetEntitlement"), "{plans}");
}

/// One trace id, sent by the client in `traceparent`, shows in the request
/// spans of messaging, billing-credits and subscription-plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_spans_messaging_billing_and_plans() {
    let (stack, _) = process_stack_with(vec![
        ("LOG_FORMAT", "json".into()),
        (
            "LOG_LEVEL",
            "info,inmail_shared::runtime::server=debug".into(),
        ),
    ])
    .await;
    subscribe_process(&stack, "tess").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut call = tonic::Request::new(send_request("tess", "ulla", "Hi", "Hello"));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let sent = messaging_at(stack.messaging.addr, &As::member("tess"))
        .send_message(call)
        .await
        .unwrap();
    assert_eq!(sent.into_inner().credits_charged, 1);
    for (service, logs) in [
        ("messaging", stack.messaging.logs()),
        ("billing-credits", stack.billing.logs()),
        ("subscription-plan", stack.plans.logs()),
    ] {
        let spans: Vec<serde_json::Value> = logs
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["span"]["trace_id"] == trace_id)
            .collect();
        assert!(
            !spans.is_empty(),
            "{service} logged no span of trace {trace_id}:\n{logs}"
        );
        assert!(
            spans.iter().any(|e| e["span"]["member_id"] == "tess"),
            "{service}: no member_id in {spans:?}"
        );
    }
}
