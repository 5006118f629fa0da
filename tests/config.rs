//! cluster.xml and userconfig.xml: valid files, defaults, every class of error with the exact
//! sentence an administrator sees, loading a node's modules, and a mutation fuzzer.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hamirror::config::*;
use hamirror::paths::Paths;

const CLUSTER_XML: &str = r#"<cluster name="pair1">
  <lan name="default">
    <node name="hostA" addr="192.168.1.10"/>
    <node name="hostB" addr="192.168.1.11"/>
  </lan>
  <lan name="replication">
    <node name="hostA" addr="10.0.0.10"/>
    <node name="hostB" addr="10.0.0.11"/>
  </lan>
</cluster>
"#;

/// DESIGN.md's example, minus the `<vm>` check (vm checks come with VM support).
const USERCONFIG_XML: &str = r#"<module name="web01" mode="mirror" id="1">
  <heart pulse="700ms" timeout="30s"> <lan name="default"/> <lan name="replication"/> </heart>
  <failover auto="on" defaultprim="alone" maxloop="3" loop_interval="24h"/>
  <splitbrain witness="192.168.1.1 192.168.1.2"/>
  <rfs sync="sync" lan="replication" zone="1MiB" bandwidth="0">
    <replicated dir="/var/lib/libvirt/images/web01"/>
    <notreplicated path="cache"/>
  </rfs>
  <vm name="web01" uri="qemu:///system" stop_timeout="120s"/>
  <user nicestoptimeout="300s" forcestoptimeout="300s"/>
  <check>
    <proc name="nginx" atleast="1" action="restart"/>
    <tcp ident="http" addr="127.0.0.1" port="80" action="stopstart"/>
  </check>
</module>
"#;

const CLUSTER_FILE: &str = "/etc/hamirror/cluster.xml";
const MODULE_FILE: &str = "/etc/hamirror/modules/web01/userconfig.xml";

fn cluster() -> ClusterConfig {
    parse_cluster(CLUSTER_XML, Path::new(CLUSTER_FILE)).expect("the example cluster.xml is valid")
}

fn three_nodes() -> ClusterConfig {
    let text = r#"<cluster name="farm">
  <lan name="default">
    <node name="n1" addr="10.1.0.1"/>
    <node name="n2" addr="10.1.0.2"/>
    <node name="n3" addr="10.1.0.3"/>
  </lan>
</cluster>"#;
    parse_cluster(text, Path::new(CLUSTER_FILE)).expect("valid three-node cluster")
}

fn module(text: &str) -> Result<ModuleConfig, ConfigError> {
    parse_module(text, Path::new(MODULE_FILE), &cluster())
}

/// The error sentence for a module text that must be refused.
fn module_err(text: &str) -> String {
    match module(text) {
        Ok(m) => panic!("expected an error, got {m:?}"),
        Err(e) => e.to_string(),
    }
}

fn cluster_err(text: &str) -> String {
    match parse_cluster(text, Path::new(CLUSTER_FILE)) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// A module text with `body` inside `<module name="web01" id="1">`, body starting on line 2.
fn with_body(body: &str) -> String {
    format!("<module name=\"web01\" id=\"1\">\n{body}\n</module>\n")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

// ---------------------------------------------------------------------------------------------
// Valid files

#[test]
fn design_cluster_example_parses() {
    // The DESIGN.md cluster.xml parses into the lans and addresses it lists.
    let c = cluster();
    assert_eq!(c.name, "pair1");
    assert_eq!(c.lans.len(), 2);
    assert_eq!(c.lans[0].name, "default");
    assert_eq!(c.lans[1].nodes[1], LanNode { name: "hostB".into(), addr: ip("10.0.0.11") });
    assert_eq!(c.node_names(), vec!["hostA".to_string(), "hostB".to_string()]);
    assert_eq!(c.addr("replication", "hostA"), Some(ip("10.0.0.10")));
    assert_eq!(c.addr("default", "hostC"), None);
    assert_eq!(c.addr("nolan", "hostA"), None);
    assert_eq!(c.pair(), Some(["hostA".to_string(), "hostB".to_string()]));
    assert_eq!(three_nodes().pair(), None);
}

#[test]
fn design_userconfig_example_parses() {
    // The DESIGN.md userconfig.xml (minus the vm check) gives exactly the typed config it says.
    let m = module(USERCONFIG_XML).expect("valid");
    assert_eq!(m.name, "web01");
    assert_eq!(m.mode, ModuleMode::Mirror);
    assert_eq!(m.id, 1);
    assert_eq!(m.heartbeat_port(), 10004);
    assert_eq!(m.replication_port(), 10005);
    assert_eq!(
        m.heart,
        HeartConfig {
            pulse: Duration::from_millis(700),
            timeout: Duration::from_secs(30),
            lans: vec!["default".into(), "replication".into()],
        }
    );
    assert_eq!(
        m.failover,
        FailoverConfig {
            auto: true,
            defaultprim: DefaultPrim::Alone,
            maxloop: 3,
            loop_interval: Duration::from_secs(86400),
        }
    );
    assert_eq!(m.splitbrain, Some(SplitBrainConfig { witnesses: vec![ip("192.168.1.1"), ip("192.168.1.2")] }));
    assert_eq!(
        m.rfs,
        Some(RfsConfig {
            sync: SyncMode::Sync,
            lan: "replication".into(),
            zone_bytes: 1 << 20,
            bandwidth_bytes_per_s: 0,
            replicated: vec![ReplicatedDir {
                dir: PathBuf::from("/var/lib/libvirt/images/web01"),
                notreplicated: vec![PathBuf::from("cache")],
            }],
        })
    );
    assert_eq!(
        m.vm,
        Some(VmConfig { name: "web01".into(), uri: "qemu:///system".into(), stop_timeout: Duration::from_secs(120) })
    );
    assert_eq!(
        m.user,
        UserConfig {
            nicestoptimeout: Duration::from_secs(300),
            forcestoptimeout: Duration::from_secs(300),
            starttimeout: Duration::from_secs(300),
            vars: vec![],
        }
    );
    assert_eq!(
        m.checks,
        vec![
            CheckConfig {
                ident: "nginx".into(),
                kind: CheckKind::Proc { name: "nginx".into(), atleast: 1 },
                action: CheckAction::Restart,
                interval: Duration::from_secs(1),
            },
            CheckConfig {
                ident: "http".into(),
                kind: CheckKind::Tcp { addr: ip("127.0.0.1"), port: 80 },
                action: CheckAction::Stopstart,
                interval: Duration::from_secs(1),
            },
        ]
    );
}

#[test]
fn minimal_module_gets_documented_defaults() {
    // A module with only name and id gets every default of docs/configuration.md.
    let m = module(r#"<module name="app" id="7"/>"#).expect("valid");
    assert_eq!(m.mode, ModuleMode::Mirror);
    assert_eq!(m.heartbeat_port(), PORT_BASE + 28);
    assert_eq!(m.heart.pulse, Duration::from_millis(700));
    assert_eq!(m.heart.timeout, Duration::from_secs(30));
    assert_eq!(m.heart.lans, vec!["default".to_string(), "replication".to_string()]);
    assert_eq!(
        m.failover,
        FailoverConfig {
            auto: true,
            defaultprim: DefaultPrim::Alone,
            maxloop: 3,
            loop_interval: Duration::from_secs(24 * 3600),
        }
    );
    assert_eq!(m.splitbrain, None);
    assert_eq!(m.rfs, None);
    assert_eq!(m.vm, None);
    assert_eq!(m.user.nicestoptimeout, Duration::from_secs(300));
    assert_eq!(m.user.forcestoptimeout, Duration::from_secs(300));
    assert_eq!(m.user.starttimeout, Duration::from_secs(300));
    assert!(m.user.vars.is_empty());
    assert!(m.checks.is_empty());
}

#[test]
fn element_defaults_fill_missing_attributes() {
    // Present-but-bare elements get their attribute defaults (rfs lan = first heart lan, zone 1MiB...).
    let m = module(&with_body(
        r#"<heart><lan name="replication"/></heart>
<failover/>
<splitbrain witness=""/>
<rfs><replicated dir="/srv/app/"/></rfs>
<vm name="vm1"/>
<user><var name="MODE" value="prod"/><var name="_x" value=""/></user>
<check><proc name="postgres"/><custom ident="ping" script="check_db"/></check>"#,
    ))
    .expect("valid");
    assert_eq!(m.heart.lans, vec!["replication".to_string()]);
    assert_eq!(m.failover.defaultprim, DefaultPrim::Alone);
    assert_eq!(m.splitbrain, None, "an empty witness list means no split-brain checker");
    let rfs = m.rfs.expect("rfs");
    assert_eq!(rfs.lan, "replication");
    assert_eq!(rfs.sync, SyncMode::Sync);
    assert_eq!(rfs.zone_bytes, 1 << 20);
    assert_eq!(rfs.bandwidth_bytes_per_s, 0);
    assert_eq!(rfs.replicated[0].dir, PathBuf::from("/srv/app"));
    let vm = m.vm.expect("vm");
    assert_eq!(vm.uri, "qemu:///system");
    assert_eq!(vm.stop_timeout, Duration::from_secs(120));
    assert_eq!(m.user.vars, vec![("MODE".into(), "prod".into()), ("_x".into(), String::new())]);
    assert_eq!(m.checks[0].ident, "postgres");
    assert_eq!(m.checks[0].kind, CheckKind::Proc { name: "postgres".into(), atleast: 1 });
    assert_eq!(m.checks[0].action, CheckAction::Restart);
    assert_eq!(m.checks[0].interval, Duration::from_secs(1));
    assert_eq!(m.checks[1].kind, CheckKind::Custom { script: "check_db".into() });
}

#[test]
fn other_accepted_values() {
    // Non-default values are taken as written: async, sizes with units, a node as defaultprim.
    let m = module(&with_body(
        r#"<heart pulse="100ms" timeout="200ms"/>
<failover auto="off" defaultprim="hostB" maxloop="0" loop_interval="90m"/>
<splitbrain witness=" 10.9.9.9   fd00::1 "/>
<rfs sync="async" zone="64KiB" bandwidth="100MiB/s">
  <replicated dir="//data/./a//"><notreplicated path="tmp/"/><notreplicated path="/data/a/logs"/></replicated>
  <replicated dir="/data/b"/>
  <notreplicated path="/data/b/cache"/>
</rfs>
<vm name="db" uri="qemu+ssh://hv1/system" stop_timeout="5m"/>
<user nicestoptimeout="10s" forcestoptimeout="20s" starttimeout="1h"/>
<check><proc ident="pg" name="postgres" atleast="2" action="stopstart" interval="5s"/></check>"#,
    ))
    .expect("valid");
    assert_eq!(m.heart.pulse, Duration::from_millis(100));
    assert_eq!(m.heart.timeout, Duration::from_millis(200));
    assert!(!m.failover.auto);
    assert_eq!(m.failover.defaultprim, DefaultPrim::Node("hostB".into()));
    assert_eq!(m.failover.maxloop, 0);
    assert_eq!(m.failover.loop_interval, Duration::from_secs(5400));
    assert_eq!(m.splitbrain.expect("witnesses").witnesses, vec![ip("10.9.9.9"), ip("fd00::1")]);
    let rfs = m.rfs.expect("rfs");
    assert_eq!(rfs.sync, SyncMode::Async);
    assert_eq!(rfs.lan, "default");
    assert_eq!(rfs.zone_bytes, 64 << 10);
    assert_eq!(rfs.bandwidth_bytes_per_s, 100 << 20);
    assert_eq!(rfs.replicated[0].dir, PathBuf::from("/data/a"));
    assert_eq!(rfs.replicated[0].notreplicated, vec![PathBuf::from("tmp"), PathBuf::from("logs")]);
    assert_eq!(rfs.replicated[1].notreplicated, vec![PathBuf::from("cache")]);
    assert_eq!(m.vm.expect("vm").uri, "qemu+ssh://hv1/system");
    assert_eq!(m.user.starttimeout, Duration::from_secs(3600));
    assert_eq!(
        m.checks[0],
        CheckConfig {
            ident: "pg".into(),
            kind: CheckKind::Proc { name: "postgres".into(), atleast: 2 },
            action: CheckAction::Stopstart,
            interval: Duration::from_secs(5),
        }
    );
    let lastprim = module(&with_body(r#"<failover defaultprim="lastprim"/>"#)).expect("valid");
    assert_eq!(lastprim.failover.defaultprim, DefaultPrim::Lastprim);
}

#[test]
fn farm_modules_run_on_any_number_of_nodes() {
    // A farm module is valid on a three-node cluster; a mirror module is not, with a hint.
    let farm = r#"<module name="lb" mode="farm" id="2"/>"#;
    let m = parse_module(farm, Path::new(MODULE_FILE), &three_nodes()).expect("valid");
    assert_eq!(m.mode, ModuleMode::Farm);
    let e = parse_module(r#"<module name="m" id="2"/>"#, Path::new(MODULE_FILE), &three_nodes())
        .expect_err("mirror on 3 nodes")
        .to_string();
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:1: <module>: expected exactly two nodes in cluster.xml for a mirror module, \
             found 3 (n1, n2, n3) (mode defaults to mirror; use mode=\"farm\" for a module on more nodes)"
        )
    );
    let e = module_err("<module name=\"lb\" mode=\"farm\" id=\"2\">\n<rfs><replicated dir=\"/x\"/></rfs>\n</module>");
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <rfs>: expected no <rfs> in a farm module, found <rfs> \
             (replication needs mode=\"mirror\")"
        )
    );
}

// ---------------------------------------------------------------------------------------------
// Error sentences

#[test]
fn duration_without_unit_names_file_line_element_attribute() {
    // A plain number where a duration is expected gives the one-sentence error of DESIGN.md.
    let e = module_err(&with_body(r#"  <heart pulse="700" timeout="30s"/>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <heart> attribute \"pulse\": expected a duration with a unit \
             (ms, s, m, h), found \"700\""
        )
    );
    let e = module_err(&with_body(r#"<user starttimeout="5 mins"/>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <user> attribute \"starttimeout\": expected a duration with a unit \
             (ms, s, m, h), found \"5 mins\" (did you mean \"5m\"?)"
        )
    );
    let e = module_err(&with_body(r#"<vm name="v" stop_timeout="-3s"/>"#));
    assert!(e.ends_with("found \"-3s\" (negative values are not allowed)"), "{e}");
    let e = module_err(&with_body(r#"<vm name="v" stop_timeout="99999999999999999999s"/>"#));
    assert!(e.ends_with("(the value is too large)"), "{e}");
}

#[test]
fn misspelt_attribute_gets_a_suggestion() {
    // An unknown attribute lists the accepted ones and suggests the nearest.
    let e = module_err(&with_body("\n  <heart pulse=\"700ms\"\n         timout=\"30s\"/>"));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:4: unknown attribute \"timout\" on <heart>, expected one of pulse, \
             timeout (did you mean \"timeout\"?)"
        )
    );
    let e = module_err(&with_body(r#"<check><proc name="x" color="red"/></check>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: unknown attribute \"color\" on <proc>, expected one of name, ident, \
             atleast, action, interval"
        )
    );
    let e = module_err(&with_body(r#"<check foo="1"/>"#));
    assert_eq!(e, format!("{MODULE_FILE}:2: unknown attribute \"foo\" on <check>, expected no attributes"));
}

#[test]
fn misspelt_element_gets_a_suggestion() {
    // An unknown element lists the accepted ones in its parent and suggests the nearest.
    let e = module_err(&with_body(r#"<hart pulse="1s"/>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: unknown element <hart> in <module>, expected one of <heart>, \
             <failover>, <splitbrain>, <rfs>, <vm>, <user>, <check> (did you mean <heart>?)"
        )
    );
    let e = module_err(&with_body("<rfs>\n<replicate dir=\"/a\"/></rfs>"));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:3: unknown element <replicate> in <rfs>, expected one of <replicated>, \
             <notreplicated> (did you mean <replicated>?)"
        )
    );
    let e = module_err("<modul name=\"web01\" id=\"1\"/>");
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:1: unknown element <modul> at the top of the file, expected <module> \
             (did you mean <module>?)"
        )
    );
    let e = module_err(&with_body(r#"<heart><lan name="default"><x/></lan></heart>"#));
    assert_eq!(e, format!("{MODULE_FILE}:2: unknown element <x> in <lan>, expected no child elements"));
}

#[test]
fn vm_check_watches_the_modules_domain() {
    // `<check><vm/>` watches the domain named by the module's `<vm>`; without one it is refused.
    let e = module_err(&with_body("<check>\n  <vm ident=\"web01\" action=\"restart\"/>\n</check>"));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:3: <vm>: expected a <vm name=\"..\"/> element in the module naming the domain to watch, \
             found a <vm> check in a module without one (add <vm name=\"DOMAIN\"/> to the module, or remove this check)"
        )
    );
    let m = module(&with_body(
        "<vm name=\"web01\" uri=\"qemu:///system\"/>\n<check>\n  <vm action=\"stopstart\" interval=\"2s\"/>\n</check>",
    ))
    .expect("valid");
    assert_eq!(m.checks.len(), 1);
    assert_eq!(m.checks[0].ident, "vm");
    assert_eq!(m.checks[0].action, CheckAction::Stopstart);
    assert_eq!(m.checks[0].kind, CheckKind::Vm { name: "web01".into(), uri: "qemu:///system".into() });
}

#[test]
fn malformed_xml_reports_the_parser_line() {
    // Malformed XML is reported with quick-xml's message and the line where it went wrong.
    let e = module(&with_body("<heart>\n<lan name=\"default\">\n</heart>")).expect_err("malformed");
    assert_eq!(e.kind, ConfigErrorKind::Xml);
    assert_eq!(e.line, Some(4));
    let s = e.to_string();
    assert!(s.starts_with(&format!("{MODULE_FILE}:4: malformed XML: ")), "{s}");

    let e = module("<module name=\"web01\" id=\"1\">\n<heart>\n").expect_err("unclosed");
    assert_eq!(
        e.to_string(),
        format!("{MODULE_FILE}:3: malformed XML: the file ends before <heart> (line 2) is closed")
    );
    let e = module("<module name=\"a\" id=\"1\" id=\"2\"/>").expect_err("dup attr");
    assert!(e.to_string().contains("duplicated attribute"), "{e}");
    let e = module("<module name=\"a&bogus;\" id=\"1\"/>").expect_err("bad entity");
    assert!(e.to_string().starts_with(&format!("{MODULE_FILE}:1: malformed XML: ")), "{e}");
    let e = module("").expect_err("empty");
    assert_eq!(
        e.to_string(),
        format!("{MODULE_FILE}:1: malformed XML: the file has no root element, expected <module>")
    );
    let e = module("<module name=\"a\" id=\"1\"/>\n<module name=\"b\" id=\"2\"/>").expect_err("2 roots");
    assert_eq!(e.line, Some(2));
    let e = module(&with_body("<heart>fast</heart>")).expect_err("text");
    assert_eq!(
        e.to_string(),
        format!(
            "{MODULE_FILE}:2: malformed XML: <heart> takes only child elements and attributes, \
             found text \"fast\""
        )
    );
}

#[test]
fn missing_and_unreadable_files_name_the_path() {
    // A missing file is one sentence with its path; a non-UTF-8 file names the line.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.xml");
    let e = load_cluster(&path).expect_err("missing");
    assert_eq!(e.kind, ConfigErrorKind::Io);
    assert_eq!(e.to_string(), format!("{}: file not found", path.display()));
    let e = load_module(&dir.path().join("nope.xml"), &cluster()).expect_err("missing");
    assert!(e.to_string().ends_with("nope.xml: file not found"), "{e}");

    std::fs::write(&path, b"<cluster name=\"c\">\n<lan name=\"\xff\"/>\n</cluster>").expect("write");
    let e = load_cluster(&path).expect_err("not utf-8");
    assert_eq!(
        e.to_string(),
        format!("{}:2: malformed XML: the file is not UTF-8 text (save it as UTF-8)", path.display())
    );

    std::fs::write(&path, CLUSTER_XML).expect("write");
    assert_eq!(load_cluster(&path).expect("valid"), cluster());
    let upath = dir.path().join("userconfig.xml");
    std::fs::write(&upath, format!("\u{feff}{USERCONFIG_XML}")).expect("write");
    assert_eq!(load_module(&upath, &cluster()).expect("valid with BOM").name, "web01");
}

#[test]
fn module_root_attributes_are_checked() {
    // name, mode and id of <module> are required or constrained as documented.
    let e = module_err(r#"<module name="web01"/>"#);
    assert_eq!(
        e,
        format!("{MODULE_FILE}:1: <module>: missing attribute \"id\", expected a whole number from 1 to 1000")
    );
    for bad in ["0", "1001", "-1", "+1", "1.0", "x", ""] {
        let e = module_err(&format!(r#"<module name="web01" id="{bad}"/>"#));
        assert_eq!(
            e,
            format!(
                "{MODULE_FILE}:1: <module> attribute \"id\": expected a whole number from 1 to 1000, found \"{bad}\""
            )
        );
    }
    let e = module_err(r#"<module name="web 01" id="1"/>"#);
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:1: <module> attribute \"name\": expected a module name of 1 to 32 letters, \
             digits, '_' or '-', found \"web 01\""
        )
    );
    let long = "a".repeat(33);
    assert!(module(&format!(r#"<module name="{long}" id="1"/>"#)).is_err());
    assert!(module(&format!(r#"<module name="{}" id="1000"/>"#, &long[..32])).is_ok());
    let e = module_err(r#"<module name="web01" mode="mirorr" id="1"/>"#);
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:1: <module> attribute \"mode\": expected mirror or farm, found \"mirorr\" \
             (did you mean \"mirror\"?)"
        )
    );
    let e = module_err(&with_body("<heart/>\n<heart/>"));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:3: <heart>: expected at most one <heart> in <module>, found a second one \
             (the first is on line 2)"
        )
    );
}

#[test]
fn heart_rules() {
    // pulse >= 50ms, timeout >= 2 x pulse, lans must exist in cluster.xml and appear once.
    let e = module_err(&with_body(r#"<heart pulse="10ms"/>"#));
    assert_eq!(
        e,
        format!("{MODULE_FILE}:2: <heart> attribute \"pulse\": expected a duration of at least 50ms, found \"10ms\"")
    );
    let e = module_err(&with_body(r#"<heart pulse="1s" timeout="1500ms"/>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <heart> attribute \"timeout\": expected at least twice the pulse \
             (2s or more), found \"1500ms\""
        )
    );
    let e = module_err(&with_body(r#"<heart pulse="20s"/>"#));
    assert!(e.contains("<heart> attribute \"pulse\": expected at most half the timeout (15s or less"), "{e}");
    let e = module_err(&with_body("<heart>\n  <lan name=\"replicaton\"/>\n</heart>"));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:3: <lan> attribute \"name\": expected a lan of cluster.xml (default, \
             replication), found \"replicaton\" (did you mean \"replication\"?)"
        )
    );
    let e = module_err(&with_body("<heart>\n<lan name=\"default\"/>\n<lan name=\"default\"/></heart>"));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:4: <lan> attribute \"name\": expected each lan once in <heart>, found \
             \"default\" (lan \"default\" is already listed on line 3)"
        )
    );
    let e = module_err(&with_body(r#"<heart><lan/></heart>"#));
    assert!(e.contains("<lan>: missing attribute \"name\""), "{e}");
}

#[test]
fn failover_rules() {
    // auto is on|off, defaultprim alone|lastprim|a node of cluster.xml, maxloop a number.
    let e = module_err(&with_body(r#"<failover auto="yes"/>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <failover> attribute \"auto\": expected on or off, found \"yes\" \
             (did you mean \"on\"?)"
        )
    );
    let e = module_err(&with_body(r#"<failover defaultprim="hostC"/>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <failover> attribute \"defaultprim\": expected alone, lastprim or a \
             node of cluster.xml (hostA, hostB), found \"hostC\" (did you mean \"hostA\"?)"
        )
    );
    let e = module_err(&with_body(r#"<failover defaultprim="lastprm"/>"#));
    assert!(e.ends_with("(did you mean \"lastprim\"?)"), "{e}");
    let e = module_err(&with_body(r#"<failover maxloop="three"/>"#));
    assert!(e.contains("expected a whole number from 0 to 1000, found \"three\""), "{e}");
    let e = module_err(&with_body(r#"<failover loop_interval="1d"/>"#));
    assert!(e.ends_with("found \"1d\" (did you mean \"24h\"?)"), "{e}");
}

#[test]
fn splitbrain_rules() {
    // The witness list holds IP addresses, each once; empty or absent means no checker.
    assert_eq!(module(&with_body("<splitbrain/>")).expect("valid").splitbrain, None);
    let e = module_err(&with_body(r#"<splitbrain witness="192.168.1.1 router"/>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <splitbrain> attribute \"witness\": expected IP addresses separated \
             by spaces, found \"192.168.1.1 router\" (\"router\" is not an IP address)"
        )
    );
    let e = module_err(&with_body(r#"<splitbrain witness="10.0.0.1 10.0.0.1"/>"#));
    assert!(e.ends_with("(10.0.0.1 is listed twice)"), "{e}");
    let e = module_err(&with_body(r#"<splitbrain witness="10.0.0.1,10.0.0.2"/>"#));
    assert!(e.contains("is not an IP address"), "{e}");
}

#[test]
fn rfs_sizes_and_lan() {
    // zone is a power of two in 4KiB..64MiB, sizes suggest binary units, lan must exist.
    let e = module_err(&with_body(r#"<rfs zone="1MB"><replicated dir="/a"/></rfs>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <rfs> attribute \"zone\": expected a size in bytes or with a unit \
             (KiB, MiB, GiB), found \"1MB\" (did you mean \"1MiB\"?)"
        )
    );
    for bad in ["3MiB", "2KiB", "128MiB", "0"] {
        let e = module_err(&with_body(&format!(r#"<rfs zone="{bad}"><replicated dir="/a"/></rfs>"#)));
        assert_eq!(
            e,
            format!(
                "{MODULE_FILE}:2: <rfs> attribute \"zone\": expected a power of two between 4KiB \
                 and 64MiB, found \"{bad}\""
            )
        );
    }
    assert_eq!(
        module(&with_body(r#"<rfs zone="4096"><replicated dir="/a"/></rfs>"#))
            .expect("valid")
            .rfs
            .expect("rfs")
            .zone_bytes,
        4096
    );
    let e = module_err(&with_body(r#"<rfs bandwidth="10Mb/s"><replicated dir="/a"/></rfs>"#));
    assert!(e.ends_with("found \"10Mb/s\" (did you mean \"10MiB\"?)"), "{e}");
    let e = module_err(&with_body(r#"<rfs lan="defualt"><replicated dir="/a"/></rfs>"#));
    assert!(e.ends_with("found \"defualt\" (did you mean \"default\"?)"), "{e}");
    let e = module_err(&with_body(r#"<rfs sync="synchronous"><replicated dir="/a"/></rfs>"#));
    assert!(e.contains("expected sync or async, found \"synchronous\""), "{e}");
    let e = module_err(&with_body("<rfs/>"));
    assert_eq!(e, format!("{MODULE_FILE}:2: <rfs>: expected at least one <replicated dir=\"/...\"/>, found none"));
}

#[test]
fn rfs_directory_rules() {
    // Replicated dirs are absolute, not /, without .., not nested; notreplicated paths resolve.
    for bad in ["relative/dir", "/", "//", "/a/../b", ""] {
        let e = module_err(&with_body(&format!(r#"<rfs><replicated dir="{bad}"/></rfs>"#)));
        assert_eq!(
            e,
            format!(
                "{MODULE_FILE}:2: <replicated> attribute \"dir\": expected an absolute directory \
                 path other than \"/\", without \"..\", found \"{bad}\""
            )
        );
    }
    let e = module_err(&with_body("<rfs>\n<replicated dir=\"/data\"/>\n<replicated dir=\"/data/sub\"/>\n</rfs>"));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:4: <replicated> attribute \"dir\": expected a directory neither inside \
             nor containing another replicated directory, found \"/data/sub\" (it is inside /data (line 3))"
        )
    );
    let e = module_err(&with_body("<rfs>\n<replicated dir=\"/data/sub\"/>\n<replicated dir=\"/data\"/>\n</rfs>"));
    assert!(e.ends_with("(it contains /data/sub (line 3))"), "{e}");
    let e = module_err(&with_body("<rfs>\n<replicated dir=\"/data\"/>\n<replicated dir=\"/data/\"/>\n</rfs>"));
    assert!(e.ends_with("(it is already listed on line 3)"), "{e}");
    // /data and /database are siblings, not nested.
    assert!(module(&with_body(r#"<rfs><replicated dir="/data"/><replicated dir="/database"/></rfs>"#)).is_ok());

    let e = module_err(&with_body(
        "<rfs>\n<replicated dir=\"/a\"/>\n<replicated dir=\"/b\"/>\n<notreplicated path=\"cache\"/>\n</rfs>",
    ));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:5: <notreplicated> attribute \"path\": expected an absolute path inside \
             one of the replicated directories (/a, /b), without \"..\", found \"cache\""
        )
    );
    let e = module_err(&with_body(r#"<rfs><replicated dir="/a"/><notreplicated path="/elsewhere/x"/></rfs>"#));
    assert!(e.contains("expected a path relative to /a (or absolute inside it)"), "{e}");
    let e = module_err(&with_body(r#"<rfs><replicated dir="/a"><notreplicated path="../etc"/></replicated></rfs>"#));
    assert!(e.ends_with("found \"../etc\""), "{e}");
    let e = module_err(&with_body(r#"<rfs><replicated dir="/a"><notreplicated path="/a"/></replicated></rfs>"#));
    assert!(e.ends_with("found \"/a\""), "{e}");
    let e = module_err(&with_body(
        r#"<rfs><replicated dir="/a"><notreplicated path="x"/></replicated><notreplicated path="/a/x/"/></rfs>"#,
    ));
    assert!(e.ends_with("(/a/x is already not replicated)"), "{e}");
}

#[test]
fn vm_and_user_rules() {
    // vm needs a name and a libvirt URI; user vars are valid names not starting with HAMIRROR_.
    let e = module_err(&with_body(r#"<vm uri="qemu:///system"/>"#));
    assert_eq!(
        e,
        format!("{MODULE_FILE}:2: <vm>: missing attribute \"name\", expected a libvirt domain name (no '/')")
    );
    let e = module_err(&with_body(r#"<vm name="a" uri="qemu"/>"#));
    assert!(e.contains("expected a libvirt URI such as qemu:///system, found \"qemu\""), "{e}");
    let e = module_err(&with_body(r#"<user><var name="HAMIRROR_NODE" value="x"/></user>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <var> attribute \"name\": expected an environment variable name \
             ([A-Za-z_][A-Za-z0-9_]*) not starting with HAMIRROR_, found \"HAMIRROR_NODE\""
        )
    );
    for bad in ["1X", "A-B", ""] {
        let e = module_err(&with_body(&format!(r#"<user><var name="{bad}" value="x"/></user>"#)));
        assert!(e.contains(&format!("found \"{bad}\"")), "{e}");
    }
    let e = module_err(&with_body(r#"<user><var name="A"/></user>"#));
    assert!(e.contains("<var>: missing attribute \"value\""), "{e}");
    let e = module_err(&with_body("<user>\n<var name=\"A\" value=\"1\"/>\n<var name=\"A\" value=\"2\"/></user>"));
    assert!(e.ends_with("(A is already set on line 3)"), "{e}");
    let e = module_err(&with_body(r#"<user nicestoptimeout="0s"/>"#));
    assert!(e.contains("expected a duration of at least 1s, found \"0s\""), "{e}");
}

#[test]
fn check_rules() {
    // Checks need their attributes, unique idents, plain script names and sane intervals.
    let e = module_err(&with_body(
        "<check>\n<proc name=\"nginx\"/>\n<tcp ident=\"nginx\" addr=\"127.0.0.1\" port=\"80\"/>\n</check>",
    ));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:4: <tcp> attribute \"ident\": expected an ident no other check uses, \
             found \"nginx\" (the <proc> check on line 3 is already \"nginx\")"
        )
    );
    let e = module_err(&with_body(r#"<check><custom ident="c" script="/bin/true"/></check>"#));
    assert_eq!(
        e,
        format!(
            "{MODULE_FILE}:2: <custom> attribute \"script\": expected the file name of a script in \
             the module's bin/ directory (no '/'), found \"/bin/true\""
        )
    );
    let e = module_err(&with_body(r#"<check><tcp ident="t" addr="localhost" port="80"/></check>"#));
    assert!(e.contains("expected an IPv4 or IPv6 address, found \"localhost\""), "{e}");
    let e = module_err(&with_body(r#"<check><tcp ident="t" addr="::1" port="70000"/></check>"#));
    assert!(e.contains("expected a whole number from 1 to 65535, found \"70000\""), "{e}");
    let e = module_err(&with_body(r#"<check><tcp ident="t" addr="::1"/></check>"#));
    assert!(e.contains("<tcp>: missing attribute \"port\""), "{e}");
    let e = module_err(&with_body(r#"<check><proc name="nginx" action="restar"/></check>"#));
    assert!(e.ends_with("expected restart or stopstart, found \"restar\" (did you mean \"restart\"?)"), "{e}");
    let e = module_err(&with_body(r#"<check><proc name="nginx" interval="10ms"/></check>"#));
    assert!(e.contains("expected a duration of at least 100ms, found \"10ms\""), "{e}");
    let e = module_err(&with_body(r#"<check><proc name="nginx" atleast="0"/></check>"#));
    assert!(e.contains("expected a whole number from 1 to 100000, found \"0\""), "{e}");
    let e = module_err(&with_body(r#"<check><proc name="a-very-long-process-name"/></check>"#));
    assert!(e.contains("(1 to 15 characters, no '/')"), "{e}");
    let e = module_err(&with_body(r#"<check><custom script="x"/></check>"#));
    assert!(e.contains("<custom>: missing attribute \"ident\""), "{e}");
}

#[test]
fn cluster_rules() {
    // cluster.xml: names, unique lans, nodes once per lan, unique valid addresses, same node sets.
    let wrap = |lans: &str| format!("<cluster name=\"c\">\n{lans}\n</cluster>");
    let e = cluster_err("<cluster name=\"c\"/>");
    assert_eq!(
        e,
        format!(
            "{CLUSTER_FILE}:1: <cluster>: expected at least one <lan name=\"...\"> listing every \
             <node name=\"...\" addr=\"...\"/>, found no <lan>"
        )
    );
    let e = cluster_err(&wrap("<lan name=\"a\"><node name=\"x\" addr=\"10.0.0.1\"/></lan>\n<lan name=\"a\"><node name=\"x\" addr=\"10.0.0.1\"/></lan>"));
    assert_eq!(
        e,
        format!(
            "{CLUSTER_FILE}:3: <lan> attribute \"name\": expected a lan name used once, found \"a\" \
             (lan \"a\" is already defined on line 2)"
        )
    );
    let e = cluster_err(&wrap(
        "<lan name=\"a\">\n<node name=\"x\" addr=\"10.0.0.1\"/>\n<node name=\"x\" addr=\"10.0.0.2\"/></lan>",
    ));
    assert_eq!(
        e,
        format!(
            "{CLUSTER_FILE}:4: <node> attribute \"name\": expected each node once in lan \"a\", \
             found \"x\" (node \"x\" is already listed on line 3)"
        )
    );
    let e = cluster_err(&wrap(
        "<lan name=\"a\">\n<node name=\"x\" addr=\"10.0.0.1\"/>\n<node name=\"y\" addr=\"10.0.0.1\"/></lan>",
    ));
    assert_eq!(
        e,
        format!(
            "{CLUSTER_FILE}:4: <node> attribute \"addr\": expected an address not used by another \
             node of lan \"a\", found \"10.0.0.1\" (node \"x\" has it on line 3)"
        )
    );
    for bad in ["10.0.0", "hostA", "0.0.0.0", "224.0.0.1", "10.0.0.1:80", ""] {
        let e = cluster_err(&wrap(&format!("<lan name=\"a\"><node name=\"x\" addr=\"{bad}\"/></lan>")));
        assert_eq!(
            e,
            format!(
                "{CLUSTER_FILE}:2: <node> attribute \"addr\": expected a unicast IPv4 or IPv6 \
                 address, found \"{bad}\""
            )
        );
    }
    let e = cluster_err(&wrap(
        "<lan name=\"a\"><node name=\"x\" addr=\"10.0.0.1\"/><node name=\"y\" addr=\"10.0.0.2\"/></lan>\n\
         <lan name=\"b\"><node name=\"x\" addr=\"10.1.0.1\"/><node name=\"z\" addr=\"10.1.0.2\"/></lan>",
    ));
    assert_eq!(
        e,
        format!(
            "{CLUSTER_FILE}:3: <lan>: expected the same nodes as lan \"a\" (x, y), found x, z \
             (missing: y; not on lan \"a\": z)"
        )
    );
    for bad in ["-x", ".x", "a b", "", &"n".repeat(64)] {
        let e = cluster_err(&wrap(&format!("<lan name=\"a\"><node name=\"{bad}\" addr=\"10.0.0.1\"/></lan>")));
        assert!(e.contains("<node> attribute \"name\": expected a name of 1 to 63"), "{e}");
    }
    let e = cluster_err(&wrap("<lan name=\"a\"/>"));
    assert!(e.contains("<lan>: expected at least one <node"), "{e}");
    let e = cluster_err(&wrap("<lan name=\"a\"><nod name=\"x\" addr=\"10.0.0.1\"/></lan>"));
    assert_eq!(e, format!("{CLUSTER_FILE}:2: unknown element <nod> in <lan>, expected <node>"));
    let e = cluster_err(&wrap("<lan nme=\"a\"/>"));
    assert!(e.ends_with("unknown attribute \"nme\" on <lan>, expected name (did you mean \"name\"?)"), "{e}");
    let e = cluster_err("<clusters name=\"c\"/>");
    assert!(e.ends_with("expected <cluster> (did you mean <cluster>?)"), "{e}");
    let e = cluster_err("<cluster><lan name=\"a\"/></cluster>");
    assert!(e.contains("<cluster>: missing attribute \"name\""), "{e}");
    // IPv6 and a single-node cluster are fine.
    let one = parse_cluster(
        "<cluster name=\"solo\"><lan name=\"v6\"><node name=\"n.1\" addr=\"fd00::1\"/></lan></cluster>",
        Path::new(CLUSTER_FILE),
    )
    .expect("valid");
    assert_eq!(one.node_names(), vec!["n.1".to_string()]);
    assert_eq!(one.pair(), None);
}

#[test]
fn local_node_by_flag_or_address() {
    // --node must name a cluster.xml node (with a suggestion); otherwise the local address decides.
    let c = cluster();
    assert_eq!(c.local_node(Some("hostB")), Ok("hostB".to_string()));
    let e = c.local_node(Some("hostb")).expect_err("unknown");
    assert_eq!(
        e.to_string(),
        "node \"hostb\" (from --node or HAMIRROR_NODE) is not in cluster.xml, expected one of \
         hostA, hostB (did you mean \"hostB\"?)"
    );
    // 192.0.2.0/24 is TEST-NET-1: never a local address.
    let c = parse_cluster(
        r#"<cluster name="t"><lan name="l"><node name="me" addr="127.0.0.1"/><node name="other" addr="192.0.2.10"/></lan></cluster>"#,
        Path::new(CLUSTER_FILE),
    )
    .expect("valid");
    assert_eq!(c.local_node(None), Ok("me".to_string()));
    let c = parse_cluster(
        r#"<cluster name="t"><lan name="l"><node name="a" addr="192.0.2.10"/><node name="b" addr="192.0.2.11"/></lan></cluster>"#,
        Path::new(CLUSTER_FILE),
    )
    .expect("valid");
    let e = c.local_node(None).expect_err("no local address");
    assert_eq!(
        e.to_string(),
        "no address of the cluster.xml nodes (a, b) is on this host; say which node this is with \
         --node NAME or HAMIRROR_NODE=NAME"
    );
    let c = parse_cluster(
        r#"<cluster name="t"><lan name="l"><node name="a" addr="127.0.0.1"/><node name="b" addr="127.0.0.2"/></lan></cluster>"#,
        Path::new(CLUSTER_FILE),
    )
    .expect("valid");
    let e = c.local_node(None).expect_err("ambiguous");
    assert!(e.to_string().contains("several cluster.xml nodes have an address on this host (a, b)"), "{e}");
    assert!(e.to_string().contains("--node NAME or HAMIRROR_NODE=NAME"), "{e}");
}

#[test]
fn units_public_api() {
    // parse_duration / parse_size / format_duration behave as docs/configuration.md says.
    assert_eq!(parse_duration("700ms"), Ok(Duration::from_millis(700)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
    assert_eq!(parse_duration("700"), Err("expected a duration with a unit (ms, s, m, h), found \"700\"".to_string()));
    assert!(parse_duration("5x").is_err());
    assert!(parse_duration("-1s").is_err());
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("64KiB"), Ok(65536));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert!(parse_size("1MB").unwrap_err().ends_with("(did you mean \"1MiB\"?)"));
    assert_eq!(format_duration(Duration::from_millis(700)), "700ms");
    assert_eq!(format_duration(Duration::from_secs(30)), "30s");
    assert_eq!(format_duration(Duration::from_secs(300)), "5m");
    assert_eq!(format_duration(Duration::from_secs(86400)), "24h");
}

// ---------------------------------------------------------------------------------------------
// Loading a node's modules

fn write_module(paths: &Paths, dir: &str, text: &str) {
    let d = paths.module_dir(dir);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(d.join("userconfig.xml"), text).expect("write");
}

fn temp_paths() -> (tempfile::TempDir, Paths) {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = Paths::new(dir.path().join("etc"), dir.path().join("state"));
    (dir, paths)
}

#[test]
fn no_modules_directory_means_no_modules() {
    // A fresh home without modules/ loads nothing and refuses nothing.
    let (_dir, paths) = temp_paths();
    let set = load_modules(&paths, &cluster());
    assert!(set.modules.is_empty() && set.refused.is_empty());
}

#[test]
fn thirty_third_mirror_module_is_refused() {
    // 32 mirror modules load; the 33rd (by name order) is refused with the limit; farms don't count.
    let (_dir, paths) = temp_paths();
    for i in 1..=33u16 {
        let name = format!("m{i:02}");
        write_module(&paths, &name, &format!(r#"<module name="{name}" id="{i}"/>"#));
    }
    write_module(&paths, "zfarm", r#"<module name="zfarm" mode="farm" id="500"/>"#);
    let set = load_modules(&paths, &cluster());
    assert_eq!(set.modules.len(), 33);
    assert_eq!(set.modules[0].name, "m01");
    assert_eq!(set.modules[31].name, "m32");
    assert_eq!(set.modules[32].name, "zfarm");
    assert_eq!(set.refused.len(), 1);
    let (name, e) = &set.refused[0];
    assert_eq!(name, "m33");
    assert_eq!(
        e.to_string(),
        format!(
            "{}:1: <module>: expected at most 32 mirror modules per node, found mirror module \
             number 33 (the limit is 32 mirror modules per node; module \"m33\" is refused)",
            paths.userconfig("m33").display()
        )
    );
}

#[test]
fn duplicate_id_and_bad_modules_are_refused_while_others_load() {
    // A reused id, a name/directory mismatch, a missing or invalid file each refuse one module only.
    let (_dir, paths) = temp_paths();
    write_module(&paths, "alpha", r#"<module name="alpha" id="5"/>"#);
    write_module(&paths, "beta", "<module name=\"beta\"\n        id=\"5\"/>");
    write_module(&paths, "gamma", r#"<module name="gamma" id="6"><heart pulse="1"/></module>"#);
    write_module(&paths, "delta", r#"<module name="other" id="7"/>"#);
    write_module(&paths, "omega", r#"<module name="omega" id="8"/>"#);
    std::fs::create_dir_all(paths.module_dir("empty")).expect("mkdir");
    std::fs::create_dir_all(paths.module_dir(".staging")).expect("mkdir");
    std::fs::write(paths.modules_dir().join("README"), "not a module").expect("write");
    let set = load_modules(&paths, &cluster());
    let loaded: Vec<&str> = set.modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(loaded, vec!["alpha", "omega"]);
    let refused: Vec<&str> = set.refused.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(refused, vec!["beta", "delta", "empty", "gamma"]);
    let msg = |n: &str| set.refused.iter().find(|(m, _)| m == n).map(|(_, e)| e.to_string()).unwrap_or_default();
    assert_eq!(
        msg("beta"),
        format!(
            "{}:2: <module> attribute \"id\": expected an id no other module uses, found \"5\" \
             (module \"alpha\" already uses id 5)",
            paths.userconfig("beta").display()
        )
    );
    assert_eq!(
        msg("delta"),
        format!(
            "{}:1: <module> attribute \"name\": expected \"delta\", the name of the module's \
             directory, found \"other\"",
            paths.userconfig("delta").display()
        )
    );
    assert_eq!(msg("empty"), format!("{}: file not found", paths.userconfig("empty").display()));
    assert!(msg("gamma").contains("<heart> attribute \"pulse\""), "{}", msg("gamma"));
}

// ---------------------------------------------------------------------------------------------
// Fuzzing

/// xorshift64*: deterministic, seedable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const VALUES: &[&str] = &[
    "",
    " ",
    "0",
    "1",
    "-1",
    "700",
    "700ms",
    "0s",
    "30s",
    "1MB",
    "1MiB",
    "3MiB",
    "64MiB",
    "4096",
    "99999999999999999999h",
    "18446744073709551616",
    "1000",
    "1001",
    "65535",
    "65536",
    "/",
    "..",
    "/a/../b",
    "/var/lib/x",
    "rel/path",
    "a b",
    "&amp;",
    "&bogus;",
    "&#0;",
    "&#x10FFFF;",
    "<",
    "\"",
    "hostA",
    "hostB",
    "hostC",
    "default",
    "replication",
    "mirror",
    "farm",
    "on",
    "off",
    "alone",
    "lastprim",
    "sync",
    "async",
    "restart",
    "stopstart",
    "::1",
    "10.0.0.1",
    "0.0.0.0",
    "é",
    "\u{0}",
    "HAMIRROR_X",
    "qemu:///system",
    "1.5s",
    "2d",
    "64KiB/s",
];

const TAGS: &[&str] = &[
    "<lan name=\"default\"/>",
    "<heart/>",
    "<rfs>",
    "</rfs>",
    "<replicated dir=\"/x\"/>",
    "<notreplicated path=\"y\"/>",
    "<check>",
    "</check>",
    "<vm/>",
    "<proc name=\"p\"/>",
    "<!-- c -->",
    "<![CDATA[x]]>",
    "<?pi x?>",
    "<!DOCTYPE x>",
    "<",
    ">",
    "/>",
    "=\"",
    "&",
    "<a><a><a><a><a><a><a><a><a><a><a><a><a><a><a><a><a><a>",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut b: Vec<u8> = text.as_bytes().to_vec();
    let rounds = if rng.below(2) == 0 { 1 } else { 2 + rng.below(2) };
    for _ in 0..rounds {
        let len = b.len();
        match rng.below(7) {
            0 if len > 0 => {
                // Flip a byte to a random value.
                let i = rng.below(len);
                b[i] = rng.next() as u8;
            }
            1 => {
                // Truncate.
                b.truncate(rng.below(len + 1));
            }
            2 if len > 0 => {
                // Duplicate a span somewhere.
                let s = rng.below(len);
                let e = (s + 1 + rng.below(64)).min(len);
                let span = b[s..e].to_vec();
                let at = rng.below(b.len() + 1);
                b.splice(at..at, span);
            }
            3 if len > 0 => {
                // Remove a span.
                let s = rng.below(len);
                let e = (s + 1 + rng.below(64)).min(len);
                b.drain(s..e);
            }
            4 | 5 => {
                // Replace one attribute value with an interesting one.
                let s = String::from_utf8_lossy(&b).into_owned();
                let starts: Vec<usize> = s.match_indices("=\"").map(|(i, _)| i + 2).collect();
                if starts.is_empty() {
                    continue;
                }
                let start = *rng.pick(&starts);
                let Some(end) = s[start..].find('"').map(|e| start + e) else {
                    continue;
                };
                let value = rng.pick(VALUES).replace('"', "&quot;");
                let value = if value == "&quot;" { "\"".to_string() } else { value };
                b = format!("{}{}{}", &s[..start], value, &s[end..]).into_bytes();
            }
            _ => {
                // Insert a tag or fragment at a random place.
                let at = rng.below(len + 1);
                b.splice(at..at, rng.pick(TAGS).bytes());
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// A refused text's error names the file and, unless it is a read error, a line inside the text.
fn check_error(e: &ConfigError, file: &str, text: &str) {
    let s = e.to_string();
    assert!(s.starts_with(file), "{s}");
    assert!(!s.contains('\n'), "one line: {s}");
    let lines = text.split('\n').count();
    match e.line {
        Some(l) => assert!(l >= 1 && l <= lines, "line {l} of {lines}: {s}"),
        None => panic!("parse errors always have a line: {s}"),
    }
}

#[test]
fn fuzz_mutations_never_panic() {
    // 20,000 seeded mutations of valid files: every one is Ok or a located Err, never a panic.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let two = cluster();
    let three = three_nodes();
    let extra = with_body(
        r#"<heart><lan name="replication"/></heart>
<rfs><replicated dir="/a"><notreplicated path="x"/></replicated><replicated dir="/b"/><notreplicated path="/b/y"/></rfs>
<user><var name="A" value="1"/></user>
<check><custom ident="c" script="s"/><proc name="p" atleast="2" interval="2s"/></check>"#,
    );
    let modules = [USERCONFIG_XML, extra.as_str(), r#"<module name="f" mode="farm" id="9"/>"#];
    let (mut ok, mut err) = (0u32, 0u32);
    for i in 0..20_000u32 {
        if i % 4 == 0 {
            let text = mutate(&mut rng, CLUSTER_XML);
            match parse_cluster(&text, Path::new(CLUSTER_FILE)) {
                Ok(c) => {
                    ok += 1;
                    let _ = (c.node_names(), c.pair(), c.local_node(Some("hostA")));
                }
                Err(e) => {
                    err += 1;
                    check_error(&e, CLUSTER_FILE, &text);
                }
            }
        } else {
            let which = rng.below(modules.len());
            let text = mutate(&mut rng, modules[which]);
            // The farm module also runs against a three-node cluster.
            let c = if which == 2 && i % 2 == 0 { &three } else { &two };
            match parse_module(&text, Path::new(MODULE_FILE), c) {
                Ok(m) => {
                    ok += 1;
                    assert!(m.id >= 1 && m.id <= MODULE_ID_MAX);
                    assert!(m.heart.timeout >= m.heart.pulse * 2);
                    assert!(!m.heart.lans.is_empty());
                }
                Err(e) => {
                    err += 1;
                    check_error(&e, MODULE_FILE, &text);
                }
            }
        }
    }
    // Both outcomes are exercised (about 5% of the mutants stay valid with this seed).
    assert!(ok > 400 && err > 10_000, "ok {ok}, err {err}");
}

#[test]
fn documented_examples_are_valid() {
    // The cluster.xml and full userconfig.xml examples of docs/configuration.md parse.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md"))
        .expect("docs/configuration.md");
    let block = |start: &str| -> String {
        let from = doc.find(&format!("```xml\n{start}")).expect("example block") + "```xml\n".len();
        let len = doc[from..].find("```").expect("end of block");
        doc[from..from + len].to_string()
    };
    let c = parse_cluster(&block("<cluster"), Path::new("docs/cluster.xml")).expect("cluster example");
    assert_eq!(c, cluster());
    let m = parse_module(&block("<module"), Path::new("docs/userconfig.xml"), &c).expect("module example");
    assert_eq!(m.checks.len(), 3);
    let rfs = m.rfs.expect("rfs");
    assert_eq!(rfs.replicated[0].notreplicated, vec![PathBuf::from("tmp"), PathBuf::from("cache")]);
    assert_eq!(m.user.vars, vec![("SITE".to_string(), "production".to_string())]);
}
