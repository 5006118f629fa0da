//! Resync through the network: `RemotePeer` against `serve_resync` over loopback TCP.

use hamirror::cluster::ClusterKey;
use hamirror::replication::channel::{handshake_receiver, Identity};
mod support;

use hamirror::replication::dirty::DirtyMaps;
use hamirror::replication::remote::{
    open_roots, serve_resync, BeginAnswer, RemoteError, RemotePeer, Served, TargetHooks, LIST_BATCH_MAX,
};
use hamirror::replication::resync::{data_ranges, full_resync, incremental_resync, Flow, ResyncOptions, ResyncStats};
use hamirror::replication::status::ResyncView;
use hamirror::replication::{Op, RelPath};
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;
use support::resync_trees::*;

const TIMEOUT: Duration = Duration::from_secs(10);
const SENDER: Identity = Identity { module_id: 7, node: 0 };
const RECEIVER: Identity = Identity { module_id: 7, node: 1 };

/// A target that always accepts a changes-only resync and records the progress it is told.
#[derive(Default)]
struct Accepting {
    progress: Vec<ResyncView>,
}

impl TargetHooks for Accepting {
    fn begin(&mut self) -> BeginAnswer {
        BeginAnswer::Ready { full: false }
    }
    fn progress(&mut self, view: ResyncView) {
        self.progress.push(view);
    }
    fn finish(&mut self, _ok: bool) {}
}

/// Connects and begins (the target refuses changes before that).
fn connect(addr: SocketAddr, key: &ClusterKey) -> RemotePeer {
    let mut peer = RemotePeer::connect(addr, key, SENDER, TIMEOUT).unwrap();
    assert_eq!(peer.begin().unwrap(), BeginAnswer::Ready { full: false });
    peer
}

fn serve(dst: &Path, key: ClusterKey) -> (SocketAddr, JoinHandle<Result<Served, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = dst.to_path_buf();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        let channel = handshake_receiver(stream, &key, RECEIVER, TIMEOUT).map_err(|e| e.to_string())?;
        let (receiver, tree) = open_roots(&[dst]).map_err(|e| e.to_string())?;
        serve_resync(channel, receiver, tree, &mut Accepting::default()).map_err(|e: RemoteError| e.to_string())
    });
    (addr, handle)
}

fn full_over_network(pair: &Pair, opts: &ResyncOptions) -> ResyncStats {
    let key = ClusterKey::from_bytes([3; 32]);
    let (addr, server) = serve(&pair.dst, key.clone());
    let mut peer = connect(addr, &key);
    let stats = done(full_resync(&pair.source(), &mut peer, None, opts, &mut |_| Flow::Continue).unwrap());
    peer.close();
    server.join().unwrap().unwrap();
    stats
}

#[test]
fn a_full_resync_through_the_network_copies_everything_then_nothing() {
    // Proves: a full resync through RemotePeer copies a sparse file (holes kept), symlinks, xattrs and a directory longer than one list page identically, and a second run sends 0 bytes.
    let pair = Pair::new();
    let f = File::create(pair.src.join("sparse.img")).unwrap();
    f.set_len(256 * MIB).unwrap();
    f.write_all_at(&random(MIB, 1), 0).unwrap();
    f.write_all_at(&random(MIB, 2), 128 * MIB).unwrap();
    f.write_all_at(&random(4 * KIB, 3), 256 * MIB - 4 * KIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::create_dir_all(pair.src.join("dir/sub")).unwrap();
    std::fs::write(pair.src.join("dir/sub/file"), random(300 * KIB, 4)).unwrap();
    std::os::unix::fs::symlink("dir/sub/file", pair.src.join("link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/outside", pair.src.join("dir/dangling")).unwrap();
    pair.source()
        .apply(&Op::SetXattr { path: rel("sparse.img"), name: "user.vm".into(), value: b"web01".to_vec(), flags: 0 })
        .unwrap();
    pair.source()
        .apply(&Op::SetXattr { path: rel("dir"), name: "user.tag".into(), value: vec![0, 1, 2], flags: 0 })
        .unwrap();
    let many = LIST_BATCH_MAX + 100;
    std::fs::create_dir(pair.src.join("many")).unwrap();
    for i in 0..many {
        std::fs::write(pair.src.join(format!("many/f{i:05}")), b"").unwrap();
    }
    // The target has data where the source has a hole, and an entry the source has not.
    std::fs::write(pair.dst.join("sparse.img"), random(8 * MIB, 5)).unwrap();
    std::fs::write(pair.dst.join("extra"), b"extra").unwrap();

    let opts = ResyncOptions::new(MIB);
    let first = full_over_network(&pair, &opts);
    assert_eq!(first.bytes_sent, 2 * MIB + 4 * KIB + 300 * KIB, "{first:?}");
    assert_same_tree(&pair.src, &pair.dst);
    let (s, d) = (File::open(pair.src.join("sparse.img")).unwrap(), File::open(pair.dst.join("sparse.img")).unwrap());
    assert_eq!(data_ranges(&d, 0, 256 * MIB).unwrap(), data_ranges(&s, 0, 256 * MIB).unwrap(), "same hole layout");
    assert_eq!(std::fs::read_dir(pair.dst.join("many")).unwrap().count(), many);

    let second = full_over_network(&pair, &opts);
    assert_eq!(second.bytes_sent, 0, "a second full resync sends nothing: {second:?}");
    assert_same_tree(&pair.src, &pair.dst);
}

#[test]
fn an_incremental_resync_through_the_network_sends_only_the_dirty_zones() {
    // Proves: an incremental resync from the dirty-zone maps through RemotePeer sends exactly the dirty zones and clears the maps.
    let pair = Pair::new();
    std::fs::write(pair.src.join("vm.img"), random(16 * MIB, 10)).unwrap();
    let opts = ResyncOptions::new(64 * KIB);
    assert_eq!(full_over_network(&pair, &opts).bytes_sent, 16 * MIB);

    let maps = DirtyMaps::open(&pair.state, 64 * KIB).unwrap();
    let src = pair.source();
    for (i, zone) in [1u64, 40, 41, 255].iter().enumerate() {
        let op = Op::Write { file: rel("vm.img"), offset: zone * 64 * KIB + 5, data: random(1000, 20 + i as u64) };
        src.apply(&op).unwrap();
        maps.track(&op).unwrap();
    }
    let key = ClusterKey::from_bytes([4; 32]);
    let (addr, server) = serve(&pair.dst, key.clone());
    let mut peer = connect(addr, &key);
    let stats = done(incremental_resync(&src, &mut peer, &maps, &opts, &mut |_| Flow::Continue).unwrap());
    assert_eq!(stats.bytes_sent, 4 * 64 * KIB, "{stats:?}");
    assert!(!stats.full);
    assert!(maps.is_clean(), "the maps are cleared once the peer has the data");
    let again = done(incremental_resync(&src, &mut peer, &maps, &opts, &mut |_| Flow::Continue).unwrap());
    assert_eq!(again.bytes_sent, 0);
    peer.close();
    server.join().unwrap().unwrap();
    assert_same_tree(&pair.src, &pair.dst);
}

#[test]
fn a_peer_with_another_cluster_key_is_refused() {
    // Proves: a client with another cluster key fails the handshake, the server never serves it, and the target is untouched.
    let pair = Pair::new();
    std::fs::write(pair.dst.join("keep"), b"keep").unwrap();
    let (addr, server) = serve(&pair.dst, ClusterKey::from_bytes([5; 32]));
    let err = RemotePeer::connect(addr, &ClusterKey::from_bytes([6; 32]), SENDER, TIMEOUT).unwrap_err();
    assert!(err.is_authentication(), "{err}");
    let served = server.join().unwrap().unwrap_err();
    assert!(served.contains("authentication"), "{served}");
    assert_eq!(std::fs::read(pair.dst.join("keep")).unwrap(), b"keep");
    assert_eq!(std::fs::read_dir(&pair.dst).unwrap().count(), 1);
}

#[test]
fn requests_outside_the_roots_are_refused() {
    // Proves: a request for a directory index the module does not have is refused with one sentence and the session goes on.
    use hamirror::replication::resync::PeerFiles;
    let pair = Pair::new();
    let key = ClusterKey::from_bytes([7; 32]);
    let (addr, server) = serve(&pair.dst, key.clone());
    let mut peer = connect(addr, &key);
    let other = RelPath::new(3, "x").unwrap();
    let e = peer.stat(&other).unwrap_err().to_string();
    assert!(e.contains("replicated directories"), "{e}");
    // Applies are pipelined: a refusal is reported by the next call.
    peer.apply(&Op::Create { file: other.clone(), mode: 0o644, uid: 0, gid: 0 }).unwrap();
    let e = peer.flush().unwrap_err().to_string();
    assert!(e.starts_with("refused"), "{e}");
    assert!(peer.remove_tree(&rel("")).is_err());
    assert!(peer.stat(&rel("")).unwrap().is_some(), "the session goes on");
    peer.close();
    server.join().unwrap().unwrap();
}

#[test]
fn changes_wait_for_begin_and_finish_ends_the_session() {
    // Proves: the target refuses changes until it accepted Begin (a verify connection can only read), a refusing target keeps refusing them, and Finish ends the session as Finished with the progress delivered to the hooks.
    use hamirror::replication::resync::PeerFiles;
    struct Refusing;
    impl TargetHooks for Refusing {
        fn begin(&mut self) -> BeginAnswer {
            BeginAnswer::NotReady
        }
        fn progress(&mut self, _view: ResyncView) {}
        fn finish(&mut self, ok: bool) {
            assert!(!ok, "a target that never began cannot finish ok");
        }
    }
    let pair = Pair::new();
    let key = ClusterKey::from_bytes([8; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = pair.dst.clone();
    let server_key = key.clone();
    let server = std::thread::spawn(move || {
        let mut results = Vec::new();
        for refusing in [true, false] {
            let (stream, _) = listener.accept().unwrap();
            let channel = handshake_receiver(stream, &server_key, RECEIVER, TIMEOUT).unwrap();
            let (receiver, tree) = open_roots(std::slice::from_ref(&dst)).unwrap();
            let mut accepting = Accepting::default();
            let hooks: &mut dyn TargetHooks = if refusing { &mut Refusing } else { &mut accepting };
            results.push(serve_resync(channel, receiver, tree, hooks).unwrap());
            results.push(Served::Finished(accepting.progress.len() == 1));
        }
        results
    });
    let create = Op::Create { file: rel("f"), mode: 0o644, uid: 0, gid: 0 };
    let mut peer = RemotePeer::connect(addr, &key, SENDER, TIMEOUT).unwrap();
    // Applies are pipelined: a refusal is reported by the next call.
    peer.apply(&create).unwrap();
    let e = peer.flush().unwrap_err().to_string();
    assert!(e.contains("before the resync began"), "{e}");
    assert_eq!(peer.begin().unwrap(), BeginAnswer::NotReady);
    peer.apply(&create).unwrap();
    assert!(peer.flush().is_err(), "still refused after a NotReady answer");
    assert!(peer.stat(&rel("")).unwrap().is_some(), "reads are served");
    peer.finish(true).unwrap();
    let mut peer = connect(addr, &key);
    peer.apply(&create).unwrap();
    peer.progress(&ResyncView { pass: 1, ..ResyncView::default() }).unwrap();
    peer.finish(true).unwrap();
    let results = server.join().unwrap();
    assert_eq!(
        results,
        vec![Served::Finished(false), Served::Finished(false), Served::Finished(true), Served::Finished(true)]
    );
    assert!(pair.dst.join("f").exists());
}
