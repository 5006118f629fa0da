//! `cluster.xml`: parsing, validation, and the questions the rest of the crate asks of it.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;

use super::check::{is_node_name, Ck, NODE_NAME_EXPECTED, R};
use super::error::{nearest, ConfigError};
use super::xml::{self, Element};
use super::{ClusterConfig, Lan, LanNode};

const ADDR_EXPECTED: &str = "a unicast IPv4 or IPv6 address";

/// Reads and validates `cluster.xml`.
pub fn load_cluster(path: &Path) -> Result<ClusterConfig, ConfigError> {
    let text = super::read_file(path)?;
    parse_cluster(&text, path)
}

/// Validates the text of `cluster.xml`; `file` is only used in error messages.
pub fn parse_cluster(text: &str, file: &Path) -> Result<ClusterConfig, ConfigError> {
    let root = xml::parse(text, file, "cluster")?;
    let ck = Ck::new(file);
    ck.root(&root, "cluster")?;
    ck.attrs(&root, &["name"])?;
    let name = ck.name(&root, "name", is_node_name, NODE_NAME_EXPECTED)?;
    ck.children(&root, &["lan"])?;
    if root.children.is_empty() {
        return Err(ck.bad_el(
            &root,
            "at least one <lan name=\"...\"> listing every <node name=\"...\" addr=\"...\"/>",
            "no <lan>",
        ));
    }
    let mut lans: Vec<Lan> = Vec::new();
    let mut lan_lines: HashMap<String, usize> = HashMap::new();
    // The first lan's node set, which every other lan must repeat.
    let mut first: Option<(String, BTreeSet<String>)> = None;
    for lan_el in &root.children {
        let lan = parse_lan(&ck, lan_el)?;
        if let Some(prev) = lan_lines.get(&lan.name) {
            return Err(ck
                .bad_named(lan_el, "name", "a lan name used once")
                .with_note(format!("lan \"{}\" is already defined on line {prev}", lan.name)));
        }
        lan_lines.insert(lan.name.clone(), lan_el.line);
        let set: BTreeSet<String> = lan.nodes.iter().map(|n| n.name.clone()).collect();
        match &first {
            None => first = Some((lan.name.clone(), set)),
            Some((first_name, first_set)) if *first_set != set => {
                let missing: Vec<&str> = first_set.difference(&set).map(String::as_str).collect();
                let extra: Vec<&str> = set.difference(first_set).map(String::as_str).collect();
                let mut note = Vec::new();
                if !missing.is_empty() {
                    note.push(format!("missing: {}", missing.join(", ")));
                }
                if !extra.is_empty() {
                    note.push(format!("not on lan \"{first_name}\": {}", extra.join(", ")));
                }
                return Err(ck
                    .bad_el(
                        lan_el,
                        format!(
                            "the same nodes as lan \"{first_name}\" ({})",
                            first_set.iter().cloned().collect::<Vec<_>>().join(", ")
                        ),
                        set.iter().cloned().collect::<Vec<_>>().join(", "),
                    )
                    .with_note(note.join("; ")));
            }
            Some(_) => {}
        }
        lans.push(lan);
    }
    Ok(ClusterConfig { name, lans })
}

fn parse_lan(ck: &Ck<'_>, el: &Element) -> R<Lan> {
    ck.attrs(el, &["name"])?;
    let name = ck.name(el, "name", is_node_name, NODE_NAME_EXPECTED)?;
    ck.children(el, &["node"])?;
    if el.children.is_empty() {
        return Err(ck.bad_el(
            el,
            "at least one <node name=\"...\" addr=\"...\"/>",
            format!("no <node> in lan \"{name}\""),
        ));
    }
    let mut nodes: Vec<LanNode> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut addrs: HashMap<IpAddr, (String, usize)> = HashMap::new();
    for n in &el.children {
        ck.attrs(n, &["name", "addr"])?;
        let node_name = ck.name(n, "name", is_node_name, NODE_NAME_EXPECTED)?;
        let addr_attr = ck.req(n, "addr", ADDR_EXPECTED)?;
        let addr = ck.ip(n, addr_attr, ADDR_EXPECTED)?;
        if addr.is_unspecified() || addr.is_multicast() || addr == IpAddr::from([255, 255, 255, 255]) {
            return Err(ck.bad(n, addr_attr, ADDR_EXPECTED));
        }
        if let Some(prev) = names.get(&node_name) {
            return Err(ck
                .bad_named(n, "name", format!("each node once in lan \"{name}\""))
                .with_note(format!("node \"{node_name}\" is already listed on line {prev}")));
        }
        if let Some((other, prev)) = addrs.get(&addr) {
            return Err(ck
                .bad(n, addr_attr, format!("an address not used by another node of lan \"{name}\""))
                .with_note(format!("node \"{other}\" has it on line {prev}")));
        }
        names.insert(node_name.clone(), n.line);
        addrs.insert(addr, (node_name.clone(), n.line));
        nodes.push(LanNode { name: node_name, addr });
    }
    Ok(Lan { name, nodes })
}

/// Why this node's name could not be decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalNodeError {
    #[error(
        "node \"{requested}\" (from --node or HAMIRROR_NODE) is not in cluster.xml, expected one of {}{}",
        .known.join(", "),
        .suggestion.as_ref().map(|s| format!(" (did you mean \"{s}\"?)")).unwrap_or_default()
    )]
    UnknownNode { requested: String, known: Vec<String>, suggestion: Option<String> },
    #[error(
        "no address of the cluster.xml nodes ({}) is on this host; say which node this is with --node NAME or HAMIRROR_NODE=NAME",
        .nodes.join(", ")
    )]
    NoLocalAddress { nodes: Vec<String> },
    #[error(
        "several cluster.xml nodes have an address on this host ({}); say which node this is with --node NAME or HAMIRROR_NODE=NAME",
        .nodes.join(", ")
    )]
    SeveralLocal { nodes: Vec<String> },
}

/// An address is local when a UDP socket can be bound to it.
fn is_local(addr: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(addr, 0)).is_ok()
}

impl ClusterConfig {
    /// Every node name, sorted, each once.
    pub fn node_names(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.lans.iter().flat_map(|l| l.nodes.iter().map(|n| n.name.as_str())).collect();
        set.into_iter().map(str::to_string).collect()
    }

    /// The lan called `name`.
    pub fn lan(&self, name: &str) -> Option<&Lan> {
        self.lans.iter().find(|l| l.name == name)
    }

    /// The address of `node` on `lan`.
    pub fn addr(&self, lan: &str, node: &str) -> Option<IpAddr> {
        self.lan(lan)?.nodes.iter().find(|n| n.name == node).map(|n| n.addr)
    }

    /// The two node names, sorted, when the cluster has exactly two nodes.
    pub fn pair(&self) -> Option<[String; 2]> {
        <[String; 2]>::try_from(self.node_names()).ok()
    }

    /// `node`'s place in the pair (0: the first node, 1: the second) and the other node's
    /// name; `None` unless the cluster has exactly two nodes, `node` one of them.
    pub fn pair_position(&self, node: &str) -> Option<(u8, String)> {
        let [first, second] = self.pair()?;
        if first == node {
            Some((0, second))
        } else if second == node {
            Some((1, first))
        } else {
            None
        }
    }

    /// Which node this host is. With `requested` (from `--node` / `HAMIRROR_NODE`), it must be a
    /// node of cluster.xml. Without it, the one node that has an address on this host (an
    /// address is local when a UDP socket can be bound to it); none or several is an error
    /// asking for `--node`.
    pub fn local_node(&self, requested: Option<&str>) -> Result<String, LocalNodeError> {
        self.local_node_with(requested, is_local)
    }

    fn local_node_with(
        &self,
        requested: Option<&str>,
        is_local: impl Fn(IpAddr) -> bool,
    ) -> Result<String, LocalNodeError> {
        let names = self.node_names();
        if let Some(r) = requested {
            if names.iter().any(|n| n == r) {
                return Ok(r.to_string());
            }
            let suggestion = nearest(r, names.iter().map(String::as_str)).map(str::to_string);
            return Err(LocalNodeError::UnknownNode { requested: r.to_string(), known: names, suggestion });
        }
        let local: Vec<String> = names
            .iter()
            .filter(|name| self.lans.iter().flat_map(|l| l.nodes.iter()).any(|n| &n.name == *name && is_local(n.addr)))
            .cloned()
            .collect();
        match <[String; 1]>::try_from(local) {
            Ok([one]) => Ok(one),
            Err(local) if local.is_empty() => Err(LocalNodeError::NoLocalAddress { nodes: names }),
            Err(local) => Err(LocalNodeError::SeveralLocal { nodes: local }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterConfig {
        parse_cluster(
            r#"<cluster name="c"><lan name="l"><node name="a" addr="10.0.0.1"/><node name="b" addr="10.0.0.2"/></lan></cluster>"#,
            Path::new("cluster.xml"),
        )
        .unwrap()
    }

    #[test]
    fn pair_position_names_the_other_node() {
        let c = cluster();
        assert_eq!(c.pair_position("a"), Some((0, "b".to_string())));
        assert_eq!(c.pair_position("b"), Some((1, "a".to_string())));
        assert_eq!(c.pair_position("z"), None);
    }

    #[test]
    fn local_node_by_address() {
        let c = cluster();
        let only_a = |ip: IpAddr| ip == IpAddr::from([10, 0, 0, 1]);
        assert_eq!(c.local_node_with(None, only_a), Ok("a".to_string()));
        assert!(matches!(c.local_node_with(None, |_| true), Err(LocalNodeError::SeveralLocal { .. })));
        assert!(matches!(c.local_node_with(None, |_| false), Err(LocalNodeError::NoLocalAddress { .. })));
    }
}
