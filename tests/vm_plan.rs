//! `vm register`, the pure half: a domain's XML parsed, its registration planned on a
//! temporary tree (real qcow2 images made with qemu-img), the module rendered.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use hamirror::config::ModuleMode;
use hamirror::vm::domain::{self, Source};
use hamirror::vm::plan::{self, ExistingModule, HostFs, Plan, PlanInput, Role};
use hamirror::vm::render;

fn fixture(name: &str, dir: &Path) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/domains").join(name);
    fs::read_to_string(&path).unwrap().replace("@DIR@", &dir.display().to_string())
}

fn qemu_img(cwd: &Path, args: &[&str]) {
    let out = Command::new("qemu-img").args(args).current_dir(cwd).output().expect("qemu-img is installed");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The tree of chain.xml: a/top.qcow2 -> ../b/mid.qcow2 -> base.qcow2 (relative to b/),
/// the NVRAM in a/, kernel and initrd in a/boot/, an ISO in iso/, a snapshot file in a/.
fn chain_tree() -> (tempfile::TempDir, HostFs) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    for d in ["a/boot", "b", "iso", "snap/web01"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    qemu_img(&root.join("b"), &["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    qemu_img(&root.join("b"), &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"]);
    qemu_img(&root.join("a"), &["create", "-q", "-f", "qcow2", "-b", "../b/mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    for f in ["a/web01_VARS.fd", "a/boot/vmlinuz", "a/boot/initrd.img", "iso/install.iso", "a/top.before-upgrade"] {
        fs::write(root.join(f), b"x").unwrap();
    }
    fs::write(root.join("snap/web01/before-upgrade.xml"), fixture("snapshot.xml", root)).unwrap();
    let fs = HostFs { snapshot_dir: root.join("snap") };
    (t, fs)
}

fn input<'a>(fs: &'a HostFs, modules: &'a [ExistingModule]) -> PlanInput<'a> {
    PlanInput { module_name: None, modules, uri: "qemu:///system", id: Some(3), peer: Some("hostB"), fs }
}

fn plan_of(xml: &str, input: &PlanInput<'_>) -> Result<Plan, String> {
    plan::plan(&domain::parse(xml).unwrap(), input)
}

fn p(root: &Path, rel: &str) -> String {
    root.join(rel).display().to_string()
}

// The disk, its 2-level chain in two directories, the NVRAM, kernel and initrd (nested in
// a/, merged into it) and the snapshot file: two directories; the ISO and the firmware must
// exist on the peer.
#[test]
fn chain_in_two_dirs_nvram_kernel_snapshot() {
    let (t, fs) = chain_tree();
    let root = t.path();
    let d = domain::parse(&fixture("chain.xml", root)).unwrap();
    assert_eq!(d.name, "web01");
    assert_eq!(d.kind, "kvm");
    assert_eq!(d.disks.len(), 3);
    assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
    assert_eq!(d.disks[1].source, None);
    assert!(d.disks[2].readonly);
    assert_eq!(d.loader.as_deref(), Some("/usr/share/OVMF/OVMF_CODE.fd"));
    assert_eq!(d.nvram.as_ref().unwrap().template.as_deref(), Some("/usr/share/OVMF/OVMF_VARS.fd"));

    let plan = plan::plan(&d, &input(&fs, &[])).unwrap();
    assert_eq!(plan.module, "web01");
    let dirs: Vec<&str> = plan.dirs.iter().map(|d| d.dir.as_str()).collect();
    assert_eq!(dirs, [p(root, "a"), p(root, "b")]);
    let files = |i: usize| -> Vec<(String, Role)> {
        plan.dirs[i].files.iter().map(|f| (f.path.clone(), f.role.clone())).collect()
    };
    let vda = || "vda".to_string();
    assert_eq!(
        files(0),
        [
            (p(root, "a/top.qcow2"), Role::Disk { target: vda() }),
            (p(root, "a/web01_VARS.fd"), Role::Nvram),
            (p(root, "a/boot/vmlinuz"), Role::Kernel),
            (p(root, "a/boot/initrd.img"), Role::Initrd),
            (p(root, "a/top.before-upgrade"), Role::Snapshot),
        ]
    );
    assert_eq!(
        files(1),
        [
            (p(root, "b/mid.qcow2"), Role::Backing { target: vda() }),
            (p(root, "b/base.qcow2"), Role::Backing { target: vda() })
        ]
    );
    assert_eq!(plan.dirs[0].others, ["boot"]);
    let peer: Vec<&str> = plan.peer_files.iter().map(|f| f.path.as_str()).collect();
    assert!(peer.contains(&"/usr/share/OVMF/OVMF_CODE.fd"), "{peer:?}");
    assert!(peer.contains(&"/usr/share/OVMF/OVMF_VARS.fd"), "{peer:?}");
    assert!(peer.contains(&p(root, "iso/install.iso").as_str()), "{peer:?}");
    assert!(plan.notes.iter().any(|n| n.contains("1 snapshot")), "{:?}", plan.notes);

    // The description and the JSON name every directory and step.
    let text = render::describe(&plan);
    for want in [
        p(root, "a").as_str(),
        "backing vda",
        "disable autostart of web01 here and on hostB",
        "id 3",
        "define web01 on hostB",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&render::json(&plan)).unwrap();
    assert_eq!(json["module"], "web01");
    assert_eq!(json["dirs"][1]["files"][0]["role"], "backing");
    assert_eq!(json["dirs"][1]["files"][0]["target"], "vda");
}

// The rendered userconfig.xml: macros replaced and escaped, one <replicated> line per
// directory with the macro's indentation, id="auto" on <module> replaced.
#[test]
fn userconfig_from_the_kvm_template() {
    let (t, fs) = chain_tree();
    let root = t.path();
    let mut plan = plan_of(&fixture("chain.xml", root), &input(&fs, &[])).unwrap();
    plan.domain = "a&b".to_string();
    let template = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-modules/kvm/userconfig.xml"));
    let heart = render::Heart { pulse: "700ms", timeout: "30s" };
    let text = render::userconfig(&plan, &template.unwrap(), "qemu+ssh://x/system?a=1&b=2", 7, heart);
    assert!(text.contains("<heart pulse=\"700ms\" timeout=\"30s\"/>"), "{text}");
    assert!(text.contains("<module name=\"web01\" mode=\"mirror\" id=\"7\">"), "{text}");
    assert!(text.contains(&format!(
        "    <replicated dir=\"{}\"/>\n    <replicated dir=\"{}\"/>\n",
        p(root, "a"),
        p(root, "b")
    )));
    assert!(
        text.contains("<vm name=\"a&amp;b\" uri=\"qemu+ssh://x/system?a=1&amp;b=2\" stop_timeout=\"120s\"/>"),
        "{text}"
    );
    assert!(!text.contains('%'), "{text}");
    let hv =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-modules/hyperv/userconfig.xml")).unwrap();
    assert!(!render::userconfig(&plan, &hv, "hyperv:///local", 1, heart).contains('%'));
}

// A block disk, or a file disk whose source is a device, is refused with the convert hint.
#[test]
fn block_disk_refused() {
    let fs = HostFs::default();
    let err = plan_of(&fixture("block.xml", Path::new("/")), &input(&fs, &[])).unwrap_err();
    assert!(err.contains("disk vda uses the block device /dev/vg0/db01"), "{err}");
    assert!(err.contains("move the disk to a file, e.g. qemu-img convert"), "{err}");
    let as_file = "<domain><name>n</name><devices><disk type='file'><source file='/dev/null'/><target dev='vdz'/></disk></devices></domain>";
    let err = plan_of(as_file, &input(&fs, &[])).unwrap_err();
    assert!(err.contains("disk vdz uses the device /dev/null: raw block devices cannot be replicated"), "{err}");
    // A host drive passed through is not refused: the peer needs one too. A VM with no disk
    // image has nothing to replicate.
    let drive = "<domain><name>n</name><devices><disk type='block' device='cdrom'><source dev='/dev/sr0'/><target dev='sdc'/></disk>@DISK@</devices></domain>";
    let err = plan_of(&drive.replace("@DISK@", ""), &input(&fs, &[])).unwrap_err();
    assert_eq!(err, "n has no disk image to replicate: a VM module needs at least one");
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("n.img"), b"").unwrap();
    let disk = format!("<disk><driver type='raw'/><source file='{}/n.img'/></disk>", t.path().display());
    let plan = plan_of(&drive.replace("@DISK@", &disk), &input(&fs, &[])).unwrap();
    assert_eq!(plan.peer_files[0].what, "host cdrom drive passed to sdc");
}

// Network and pool volume disks are refused, one sentence each.
#[test]
fn network_and_volume_disks_refused() {
    let fs = HostFs::default();
    let d = domain::parse(&fixture("network.xml", Path::new("/"))).unwrap();
    assert_eq!(d.disks[0].source, Some(Source::Network { protocol: "rbd".into(), name: "pool/ceph01-disk0".into() }));
    let err = plan::plan(&d, &input(&fs, &[])).unwrap_err();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].starts_with("disk vda is on network storage (rbd:pool/ceph01-disk0)"), "{err}");
    assert!(lines[1].starts_with("disk vdb is a storage pool volume"), "{err}");
}

// A disk directly in /var/lib/libvirt is refused with the move hint (before looking for it).
#[test]
fn disk_in_a_system_dir_refused() {
    let fs = HostFs::default();
    let err = plan_of(&fixture("libvirt-direct.xml", Path::new("/")), &input(&fs, &[])).unwrap_err();
    assert_eq!(
        err,
        "disk vda: /var/lib/libvirt/old01.qcow2 lies directly in /var/lib/libvirt, which cannot be replicated as a whole: move the disk to a directory of its own such as /var/lib/libvirt/images/old01/"
    );
}

// Shareable disks, missing files, a taken module name, a directory another module
// replicates (or nests with), the mirror module limit, a domain name that is no module name.
#[test]
fn module_and_disk_refusals() {
    let (t, fs) = chain_tree();
    let root = t.path();
    let xml = fixture("chain.xml", root);
    let other = |name: &str, dir: &str| ExistingModule {
        name: name.to_string(),
        mode: ModuleMode::Mirror,
        dirs: vec![PathBuf::from(dir)],
    };
    let modules = [other("web01", "/srv/x"), other("m1", &p(root, "b")), other("m2", &p(root, "a/boot"))];
    let err = plan_of(&xml, &input(&fs, &modules)).unwrap_err();
    assert!(err.contains("a module named web01 is already installed: choose another name with --module"), "{err}");
    assert!(err.contains(&format!("{} is already replicated by module m1", p(root, "b"))), "{err}");
    assert!(
        err.contains(&format!("{} contains {}, replicated by module m2", p(root, "a"), p(root, "a/boot"))),
        "{err}"
    );
    let mut inp = input(&fs, &modules[1..2]);
    inp.module_name = Some("web 01");
    assert!(plan_of(&xml, &inp).unwrap_err().contains("\"web 01\" is not a valid module name"));

    let many: Vec<ExistingModule> = (0..32).map(|i| other(&format!("m{i}"), &format!("/srv/m{i}"))).collect();
    let err = plan_of(&xml, &input(&fs, &many)).unwrap_err();
    assert_eq!(err, "32 mirror modules are installed and a node runs at most 32: remove one first");

    let bad = xml.replace("<name>web01</name>", "<name>web.01</name>").replace("<readonly/>", "<shareable/>");
    let err = plan::plan(&domain::parse(&bad).unwrap(), &input(&fs, &[])).unwrap_err();
    assert!(err.contains("cdrom sdb is shareable"), "{err}");
    assert!(
        err.contains("the domain name \"web.01\" is not a valid module name") && err.contains("--module NAME"),
        "{err}"
    );
    fs::remove_file(root.join("b/base.qcow2")).unwrap();
    let err = plan_of(&xml, &input(&fs, &[])).unwrap_err();
    assert_eq!(err, format!("disk vda: {} does not exist on this host", p(root, "b/base.qcow2")));
}

// A qcow2 whose backing chain loops is refused, not followed forever.
#[test]
fn backing_loop_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("vm");
    fs::create_dir(&dir).unwrap();
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]);
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "y.qcow2"]);
    qemu_img(&dir, &["rebase", "-q", "-u", "-b", "y.qcow2", "-F", "qcow2", "x.qcow2"]);
    let xml = format!(
        "<domain><name>loop</name><devices><disk><driver type='qcow2'/><source file='{}/y.qcow2'/><target dev='vda'/></disk></devices></domain>",
        dir.display()
    );
    let fs = HostFs { snapshot_dir: t.path().join("none") };
    let err = plan_of(&xml, &input(&fs, &[])).unwrap_err();
    assert!(err.contains("loops back to"), "{err}");
}

// Malformed XML, another root element, no name: one sentence.
#[test]
fn malformed_xml_is_one_sentence() {
    let err = domain::parse(&fixture("malformed.xml", Path::new("/"))).unwrap_err();
    assert!(err.starts_with("the domain XML is malformed at line "), "{err}");
    assert_eq!(err.lines().count(), 1);
    assert!(domain::parse("<domain><name>x</name>").unwrap_err().contains("ends before <domain> is closed"));
    assert!(domain::parse("").unwrap_err().contains("empty"));
    assert!(domain::parse("<network/>").unwrap_err().contains("root element is <network>"));
    assert_eq!(domain::parse("<domain type='kvm'/>").unwrap_err(), "the domain definition has no <name>");
}

// The Hyper-V form: Windows paths collected, folders proposed, no filesystem consulted.
#[test]
fn hyperv_domain_planned_without_the_filesystem() {
    let d = domain::parse(&fixture("hyperv.xml", Path::new("/"))).unwrap();
    assert!(d.is_hyperv());
    assert_eq!(
        d.hyperv_config.as_deref(),
        Some("C:\\Hyper-V\\win01\\Virtual Machines\\0F6B3C1E-2A4D-4E8F-9C7B-5D1A2E3F4A5B.vmcx")
    );
    let fs = HostFs::default();
    let mut inp = input(&fs, &[]);
    inp.uri = "hyperv:///local";
    let plan = plan::plan(&d, &inp).unwrap();
    let dirs: Vec<&str> = plan.dirs.iter().map(|d| d.dir.as_str()).collect();
    assert_eq!(dirs, ["C:\\Hyper-V\\win01\\Virtual Hard Disks", "C:\\Hyper-V\\win01\\Virtual Machines", "D:\\Data"]);
    assert_eq!(plan.dirs[1].files[0].role, Role::HypervConfig);
    assert!(render::describe(&plan).contains("vm-modules/hyperv"));
    let at_root = fixture("hyperv.xml", Path::new("/")).replace("D:\\Data\\win01-data.vhdx", "E:\\win01.vhdx");
    let err = plan_of(&at_root, &inp).unwrap_err();
    assert_eq!(err, "E:\\win01.vhdx lies at the root of a drive: move it to a folder of its own");
}

/// A host where every listed path is a regular file on a filesystem of the given magic.
struct FakeFs {
    files: Vec<(&'static str, i64)>,
    mountovers: Vec<PathBuf>,
}

impl plan::Fs for FakeFs {
    fn kind(&self, path: &Path) -> std::io::Result<plan::FileKind> {
        let found = self.files.iter().any(|(f, _)| Path::new(f) == path);
        Ok(if found { plan::FileKind::File } else { plan::FileKind::Missing })
    }
    fn read(&self, _: &Path, _: u64, _: usize) -> std::io::Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn fs_magic(&self, path: &Path) -> std::io::Result<i64> {
        Ok(self.files.iter().find(|(f, _)| Path::new(f) == path).map_or(0xEF53, |(_, m)| *m))
    }
    fn mountovers(&self) -> Vec<PathBuf> {
        self.mountovers.clone()
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        let names = self.files.iter().filter_map(|(f, _)| Path::new(f).strip_prefix(dir).ok());
        Ok(names.filter(|n| n.components().count() == 1).map(|n| n.display().to_string()).collect())
    }
    fn snapshots(&self, _: &str) -> std::io::Result<Vec<String>> {
        Ok(Vec::new())
    }
}

fn one_disk(path: &str, nvram: &str) -> String {
    format!(
        "<domain type='kvm'><name>web01</name><os><nvram>{nvram}</nvram></os><devices>\
         <disk type='file' device='disk'><driver type='raw'/><source file='{path}'/><target dev='vda'/></disk>\
         </devices></domain>"
    )
}

// libvirt's shared pools are proposed only when they hold nothing but this VM's files; shared
// and network filesystems are refused, FUSE only when it is not our own mountover.
#[test]
fn shared_pools_and_shared_filesystems() {
    const EXT4: i64 = 0xEF53;
    let plan_with = |fs: &FakeFs, xml: &str| {
        plan::plan(
            &domain::parse(xml).unwrap(),
            &PlanInput { module_name: None, modules: &[], uri: "qemu:///system", id: None, peer: None, fs },
        )
    };
    let fake = FakeFs {
        files: vec![
            ("/var/lib/libvirt/images/web01.img", EXT4),
            ("/var/lib/libvirt/qemu/nvram/web01_VARS.fd", EXT4),
            ("/var/lib/libvirt/qemu/nvram/db01_VARS.fd", EXT4),
            ("/srv/vm/web01/VARS.fd", EXT4),
            ("/nfs/vm/web01.img", 0x6969),
            ("/gluster/vm/web01.img", 0x6573_5546),
            ("/srv/mirrored/web01.img", 0x6573_5546),
        ],
        mountovers: vec![PathBuf::from("/srv/mirrored")],
    };
    let plan = plan_with(&fake, &one_disk("/var/lib/libvirt/images/web01.img", "/srv/vm/web01/VARS.fd")).unwrap();
    let dirs: Vec<&str> = plan.dirs.iter().map(|d| d.dir.as_str()).collect();
    assert_eq!(dirs, ["/srv/vm/web01", "/var/lib/libvirt/images"]);
    assert!(render::describe(&plan).contains("the lowest free id"));

    let err =
        plan_with(&fake, &one_disk("/var/lib/libvirt/images/web01.img", "/var/lib/libvirt/qemu/nvram/web01_VARS.fd"))
            .unwrap_err();
    assert_eq!(
        err,
        "/var/lib/libvirt/qemu/nvram/web01_VARS.fd lies in /var/lib/libvirt/qemu/nvram, which also holds files of other VMs (db01_VARS.fd): move this VM's files to a directory of its own such as /var/lib/libvirt/images/web01/ and update the domain (virsh edit)"
    );
    let err = plan_with(&fake, &one_disk("/nfs/vm/web01.img", "/srv/vm/web01/VARS.fd")).unwrap_err();
    assert!(err.starts_with("disk vda: /nfs/vm/web01.img is on shared or network storage (NFS)"), "{err}");
    let err = plan_with(&fake, &one_disk("/gluster/vm/web01.img", "/srv/vm/web01/VARS.fd")).unwrap_err();
    assert!(err.contains("(FUSE"), "{err}");
    assert!(plan_with(&fake, &one_disk("/srv/mirrored/web01.img", "/srv/vm/web01/VARS.fd")).is_ok());
}
