//! The QEMU driver: one `qemu-system-x86_64 -M microvm` process per container.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::qmp::Qmp;
use crate::{Accel, Boot, Hypervisor, VmError, VmProcess, VmSpec};

/// File names inside a VM's run directory.
pub const CONTROL_SOCKET: &str = "ctl.sock";
/// QMP socket of the VM (kept for pause, resize and snapshots).
pub const QMP_SOCKET: &str = "qmp.sock";
/// QEMU's pid file.
pub const PID_FILE: &str = "qemu.pid";
/// Directory shared with the guest over 9p ([`crate::SHARE_TAG`]): the
/// daemon bind-mounts a container's volumes and bind mounts under it.
/// They may live on several host filesystems, so QEMU remaps inode numbers
/// (`multidevs=remap`) to keep them unique in the guest.
pub const SHARE_DIR: &str = "share";
/// The guest's serial console.
pub const CONSOLE_LOG: &str = "console.log";
/// QEMU's own stderr.
pub const QEMU_LOG: &str = "qemu.log";

/// The guest kernel's command line. `tsc=reliable`: under TCG the clock
/// watchdog would otherwise reject the TSC, leaving only the jiffies
/// clocksource, with which the kernel cannot stop its tick when idle (an
/// idle VM then costs ~5% of a host CPU).
pub const KERNEL_CMDLINE: &str =
    "console=ttyS0 quiet reboot=t panic=-1 tsc=reliable vessel.transport=virtio-serial";

/// The frequency of QEMU's emulated local APIC timer (a fixed 1 GHz bus
/// clock in `hw/intc/apic.c`). Told to TCG guests with `lapic_bus_hz=` (a
/// parameter of Vessel's guest kernel, `guest/kernel/patches`) so that they
/// need not calibrate the timer.
pub const TCG_APIC_BUS_HZ: u32 = 1_000_000_000;

/// Size of TCG's translation block cache per VM, in MiB.
pub const TCG_TB_MIB: u32 = 32;

/// The QEMU hypervisor driver.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    accel: Accel,
    version: String,
    cmdline: String,
    /// The host TSC rate told to TCG guests, in kHz.
    tsc_khz: Option<u32>,
}

impl Qemu {
    /// A driver for `binary` with the acceleration chosen by the probe.
    pub fn new(binary: PathBuf, accel: Accel) -> Result<Self, VmError> {
        let out = Command::new(&binary)
            .arg("--version")
            .output()
            .map_err(|e| VmError::io(format!("run {} --version", binary.display()), e))?;
        // The whole version, with the build's package version in brackets
        // ("7.2.22 (vessel 3cb7…)", "7.2.22 (Debian 1:7.2+dfsg-7…)"): two
        // builds of one QEMU release save device state differently, and
        // templates are keyed by this string.
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.split_once("version ").map(|(_, v)| v.trim().to_string()))
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                VmError::Spawn(format!(
                    "{} --version printed no version: {}",
                    binary.display(),
                    String::from_utf8_lossy(&out.stdout).trim()
                ))
            })?;
        let (cmdline, tsc_khz) = kernel_cmdline(accel);
        Ok(Self {
            binary,
            accel,
            version,
            cmdline,
            tsc_khz,
        })
    }

    /// QEMU's version string.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The full argument list for `spec` (without the binary); `tap_fds`
    /// are the descriptors, open in QEMU, of the network slots' taps.
    pub fn args(&self, spec: &VmSpec, tap_fds: &[RawFd]) -> Vec<String> {
        let run = |f: &str| spec.run_dir.join(f).display().to_string();
        let cpu = match self.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        };
        let cmdline = self.cmdline.as_str();
        let mut a: Vec<String> = vec![];
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["-name", &format!("vessel-{}", spec.name)]);
        let machine = "microvm,acpi=off,x-option-roms=off,rtc=off";
        match &spec.boot {
            Boot::Cold => push(&["-machine", machine]),
            Boot::Template { memory } | Boot::Clone { memory, .. } => {
                let share = if matches!(spec.boot, Boot::Template { .. }) {
                    "on"
                } else {
                    "off"
                };
                push(&["-machine", &format!("{machine},memory-backend=mem")]);
                push(&[
                    "-object",
                    &format!(
                        "memory-backend-file,id=mem,size={}M,mem-path={},share={share}",
                        spec.memory_mib,
                        memory.display()
                    ),
                ]);
            }
        }
        let accel = match self.accel {
            Accel::Kvm => "kvm".to_string(),
            // A bounded translation cache: each VM's translated code is private
            // memory, and an idle container needs little of it. split-wx puts
            // the cache in a memfd, whose pages can be released (see `jit`).
            Accel::Tcg => format!("tcg,tb-size={TCG_TB_MIB},split-wx=on"),
        };
        push(&["-accel", &accel, "-cpu", cpu]);
        push(&[
            "-m",
            &format!("{}M", spec.memory_mib),
            "-smp",
            &spec.vcpus.to_string(),
        ]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        // A clone's kernel is already in the template's memory. Loading it
        // again would copy it into the clone's private memory (~25 MiB each).
        if !matches!(spec.boot, Boot::Clone { .. }) {
            push(&["-kernel", &spec.kernel.display().to_string()]);
            push(&["-initrd", &spec.initrd.display().to_string()]);
            push(&["-append", cmdline]);
        }
        push(&[
            "-chardev",
            &format!("file,id=con,path={}", run(CONSOLE_LOG)),
            "-serial",
            "chardev:con",
        ]);
        // Device slots, identical for every container VM.
        push(&[
            "-drive",
            &format!(
                "id=img,file={},format=raw,if=none,read-only=on",
                spec.image_disk.display()
            ),
        ]);
        push(&["-device", "virtio-blk-device,drive=img,serial=image"]);
        push(&[
            "-drive",
            &format!(
                "id=upper,file={},format=qcow2,if=none,discard=unmap",
                spec.upper_disk.display()
            ),
        ]);
        push(&["-device", "virtio-blk-device,drive=upper,serial=upper"]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=ctl,path={},server=on,wait=off",
                run(CONTROL_SOCKET)
            ),
        ]);
        push(&["-device", "virtio-serial-device,max_ports=2"]);
        push(&[
            "-device",
            &format!(
                "virtserialport,chardev=ctl,name={}",
                vessel_protocol::VIRTIO_PORT_NAME
            ),
        ]);
        for (slot, fd) in tap_fds.iter().enumerate() {
            // vhost stays off: it needs KVM's ioeventfd, and a template's
            // device state must restore the same way on both paths.
            push(&[
                "-netdev",
                &format!("tap,id=net{slot},fd={fd},vhost=off"),
                "-device",
                &format!(
                    "virtio-net-device,netdev=net{slot},mac={}",
                    crate::slot_mac(slot)
                ),
            ]);
        }
        push(&[
            "-fsdev",
            &format!(
                "local,id=share,path={},security_model=passthrough,multidevs=remap",
                run(SHARE_DIR)
            ),
            "-device",
            &format!(
                "virtio-9p-device,fsdev=share,mount_tag={}",
                crate::SHARE_TAG
            ),
        ]);
        push(&[
            "-object",
            "rng-random,id=rng,filename=/dev/urandom",
            "-device",
            "virtio-rng-device,rng=rng",
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", run(QMP_SOCKET)),
        ]);
        if self.accel == Accel::Tcg {
            // How the translation cache is flushed from outside (`jit`).
            push(&[
                "-gdb",
                &format!("unix:{},server=on,wait=off", run(crate::jit::GDB_SOCKET)),
            ]);
        }
        push(&["-pidfile", &run(PID_FILE)]);
        if matches!(spec.boot, Boot::Clone { .. }) {
            push(&["-incoming", "defer"]);
        }
        a
    }
}

/// [`KERNEL_CMDLINE`], and under TCG what the guest would otherwise have to
/// calibrate against the emulated PIT (which fails when the host is loaded
/// while the guest boots, see [`crate::tsc`]): the APIC timer's rate always,
/// the TSC's when the host's can be measured. Under KVM the guest has
/// kvm-clock and the TSC-deadline timer and calibrates nothing.
fn kernel_cmdline(accel: Accel) -> (String, Option<u32>) {
    match accel {
        Accel::Kvm => (KERNEL_CMDLINE.to_string(), None),
        Accel::Tcg => {
            let mut cmdline = format!("{KERNEL_CMDLINE} lapic_bus_hz={TCG_APIC_BUS_HZ}");
            let tsc = crate::tsc::host_tsc_khz();
            match &tsc {
                Ok(khz) => {
                    tracing::info!(khz, "host TSC rate measured for TCG guests");
                    cmdline.push_str(&format!(" tsc_early_khz={khz}"));
                }
                Err(why) => tracing::warn!(
                    "TCG guests will calibrate their TSC themselves, which fails when the \
                     host is busy while they boot: {why}"
                ),
            }
            (cmdline, tsc.ok())
        }
    }
}

impl Hypervisor for Qemu {
    fn describe(&self) -> String {
        // The TSC rate in MHz: templates follow a different host, not the
        // few kHz two measurements on one host differ by.
        let tsc = self
            .tsc_khz
            .map(|khz| format!(", host TSC {} MHz", (khz + 500) / 1000))
            .unwrap_or_default();
        format!("qemu {} ({}{tsc})", self.version, self.accel.as_str())
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn spawn(&self, spec: &VmSpec) -> Result<VmProcess, VmError> {
        let taps = crate::tap::open(&spec.taps, &spec.tap_owner)?;
        let spawned = self.spawn_on_taps(spec, &taps);
        // QEMU holds its own copies now (or is gone).
        drop(taps);
        match spawned {
            Ok(vm) => {
                // However the VM ends, its taps go once it has.
                crate::tap::remove_after_exit(Some(vm.pid), spec.taps.clone());
                Ok(vm)
            }
            Err(e) => {
                // QEMU has been reaped: its taps are free to go.
                crate::tap::remove(&spec.taps);
                Err(e)
            }
        }
    }

    fn build_template(&self, spec: &VmSpec, state: &Path) -> Result<(), VmError> {
        let taps = crate::tap::open(&spec.taps, &spec.tap_owner)?;
        let r = self.build_template_on_taps(spec, state, &taps);
        drop(taps);
        // The template VM has been reaped either way.
        crate::tap::remove(&spec.taps);
        r
    }
}

impl Qemu {
    fn spawn_on_taps(&self, spec: &VmSpec, taps: &[OwnedFd]) -> Result<VmProcess, VmError> {
        std::fs::create_dir_all(&spec.run_dir)
            .map_err(|e| VmError::io(format!("create {}", spec.run_dir.display()), e))?;
        let share = spec.run_dir.join(SHARE_DIR);
        std::fs::create_dir_all(&share)
            .map_err(|e| VmError::io(format!("create {}", share.display()), e))?;
        let ctl = spec.run_dir.join(CONTROL_SOCKET);
        for f in [CONTROL_SOCKET, QMP_SOCKET, PID_FILE] {
            let _ = std::fs::remove_file(spec.run_dir.join(f));
        }
        let log_path = spec.run_dir.join(QEMU_LOG);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| VmError::io(format!("open {}", log_path.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmError::io("dup qemu log", e))?;
        let mut cmd = Command::new(&self.binary);
        let tap_fds: Vec<RawFd> = taps.iter().map(AsRawFd::as_raw_fd).collect();
        let inherited = tap_fds.clone();
        // SAFETY: fcntl(2) is async-signal-safe; the closure only reads a
        // vector allocated before the fork. It lets QEMU inherit the taps'
        // descriptors (they are close-on-exec for every other child).
        unsafe {
            cmd.pre_exec(move || {
                for fd in &inherited {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        if spec.background {
            // SAFETY: setpriority(2) is async-signal-safe and touches no
            // memory of the parent; it runs in the child before exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setpriority(libc::PRIO_PROCESS, 0, 10) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(self.args(spec, &tap_fds))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: signals aimed at the daemon (Ctrl-C, a
            // service manager stopping it) must not reach the VMs.
            .process_group(0)
            .spawn()
            .map_err(|e| VmError::io(format!("run {}", self.binary.display()), e))?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ctl.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let msg = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(VmError::Spawn(format!(
                    "qemu exited with {status}: {}",
                    msg.trim()
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VmError::Spawn(
                    "qemu did not create its control socket within 20s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Boot::Clone { state, .. } = &spec.boot {
            if let Err(e) = restore(&spec.run_dir.join(QMP_SOCKET), state) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        // The child handle is dropped without waiting: the engine reaps the
        // process through its pid (see `wait_exit`), also after a restart.
        Ok(VmProcess {
            pid,
            control_socket: ctl,
        })
    }

    fn build_template_on_taps(
        &self,
        spec: &VmSpec,
        state: &Path,
        taps: &[OwnedFd],
    ) -> Result<(), VmError> {
        if !matches!(spec.boot, Boot::Template { .. }) {
            return Err(VmError::Spawn(
                "build_template needs a Boot::Template spec".into(),
            ));
        }
        // Under load, the guest kernel's timer calibration at boot can fail
        // (software emulation runs the calibration loops late): it then
        // keeps the jiffies clocksource or the PIT, cannot stop its tick,
        // and every clone of the template costs a share of a host CPU while
        // idle. The template is kept (its clones run correctly) and the log
        // says so. Booting it again was tried: under sustained load the
        // retries failed as well, and the longer build meant more cold
        // boots, which made the load worse.
        let _ = std::fs::remove_file(spec.run_dir.join(CONSOLE_LOG));
        let vm = self.spawn_on_taps(spec, taps)?;
        let clock = wait_ready(spec, &vm)?;
        if let Some(problem) = clock_problem(&clock) {
            tracing::warn!(
                "template VM booted with {problem}: its idle clones will not stop their \
                 timer tick"
            );
        }
        let kill = || kill_and_reap(vm.pid, &spec.name);
        let tmp = state.with_extension("tmp");
        let result = (|| {
            let mut q = Qmp::connect(&spec.run_dir.join(QMP_SOCKET), Duration::from_secs(10))?;
            q.execute("stop", json!({}))?;
            q.execute(
                "migrate-set-capabilities",
                json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] }),
            )?;
            q.execute(
                "migrate",
                json!({ "uri": format!("exec:cat > {}", shell_quote(&tmp)) }),
            )?;
            q.wait_migration(Duration::from_secs(60))?;
            std::fs::rename(&tmp, state)
                .map_err(|e| VmError::io(format!("rename {}", state.display()), e))
        })();
        kill();
        result
    }
}

fn kill_and_reap(pid: u32, name: &str) {
    crate::kill_vm(pid, name);
    let mut status = 0;
    // SAFETY: waitpid on our own child to reap it.
    unsafe {
        libc::waitpid(pid as libc::pid_t, &mut status, 0);
    }
}

/// Waits until the agent of a booting template VM is ready; returns its
/// `clock` console line (clocksource and clock event device).
fn wait_ready(spec: &VmSpec, vm: &VmProcess) -> Result<String, VmError> {
    let console = spec.run_dir.join(CONSOLE_LOG);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("vessel-init: ready") {
            let clock = text
                .lines()
                .find_map(|l| l.strip_prefix("vessel-init: clock "))
                .unwrap_or("")
                .trim()
                .to_string();
            return Ok(clock);
        }
        if !crate::vm_alive(vm.pid, &spec.name) || Instant::now() > deadline {
            kill_and_reap(vm.pid, &spec.name);
            return Err(VmError::Spawn(format!(
                "template VM never became ready: {}",
                text.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What is wrong with a booted guest's clock, from the agent's `clock`
/// line (`<clocksource> <clock event device>`): `None` when it can stop its
/// tick when idle.
fn clock_problem(clock: &str) -> Option<String> {
    let mut parts = clock.split_whitespace();
    let (source, event) = (parts.next().unwrap_or("?"), parts.next().unwrap_or("?"));
    if source.contains("jiffies") || event == "pit" {
        Some(format!(
            "clocksource {source} and clock events from {event} (timer calibration failed)"
        ))
    } else {
        None
    }
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Loads a template's device state into a clone started with `-incoming defer`
/// and lets it run.
fn restore(qmp: &Path, state: &Path) -> Result<(), VmError> {
    let mut q = Qmp::connect(qmp, Duration::from_secs(10))?;
    q.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] }),
    )?;
    q.execute(
        "migrate-incoming",
        json!({ "uri": format!("exec:cat {}", shell_quote(state)) }),
    )?;
    q.wait_migration(Duration::from_secs(60))?;
    q.execute("cont", json!({}))?;
    Ok(())
}

/// Reads the pid QEMU wrote for the VM in `run_dir`.
pub fn read_pid(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(run_dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "abc".into(),
            run_dir: "/run/x".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            image_disk: "/img.ext4".into(),
            upper_disk: "/up.qcow2".into(),
            memory_mib: 256,
            vcpus: 2,
            boot: Boot::Cold,
            background: false,
            taps: crate::tap_names(Path::new("/run/x")),
            tap_owner: "vb0".into(),
        }
    }

    #[test]
    fn a_guest_left_on_jiffies_or_the_pit_has_a_clock_problem() {
        assert_eq!(clock_problem("tsc lapic"), None);
        assert_eq!(clock_problem("kvm-clock lapic-deadline"), None);
        let p = clock_problem("refined-jiffies pit").expect("jiffies and the PIT");
        assert!(p.contains("refined-jiffies") && p.contains("pit"), "{p}");
        assert!(clock_problem("tsc pit").is_some());
        assert!(clock_problem("jiffies lapic").is_some());
    }

    #[test]
    fn tcg_guests_are_told_their_timer_rates() {
        let (kvm, none) = kernel_cmdline(Accel::Kvm);
        assert_eq!((kvm.as_str(), none), (KERNEL_CMDLINE, None));
        let (tcg, tsc) = kernel_cmdline(Accel::Tcg);
        assert!(tcg.starts_with(KERNEL_CMDLINE), "{tcg}");
        assert!(tcg.contains(" lapic_bus_hz=1000000000"), "{tcg}");
        match (tsc, crate::tsc::host_tsc_khz()) {
            (Some(khz), Ok(_)) => assert!(tcg.contains(&format!(" tsc_early_khz={khz}")), "{tcg}"),
            (None, Err(_)) => assert!(!tcg.contains("tsc_early_khz"), "{tcg}"),
            (a, b) => panic!("measured {a:?} once and {b:?} the next time"),
        }
        // Cold boots and templates boot with it.
        let q = Qemu {
            binary: "qemu".into(),
            accel: Accel::Tcg,
            version: "7.2".into(),
            cmdline: tcg.clone(),
            tsc_khz: tsc,
        };
        let args = q.args(&spec(), &[3, 4, 5]);
        let append = args.iter().position(|a| a == "-append").expect("-append");
        assert_eq!(args[append + 1], tcg);
        if let Some(khz) = tsc {
            let mhz = (khz + 500) / 1000;
            assert!(
                q.describe().contains(&format!("host TSC {mhz} MHz")),
                "{}",
                q.describe()
            );
        }
    }

    #[test]
    fn device_layout_does_not_depend_on_the_container() {
        let q = Qemu {
            binary: "qemu".into(),
            accel: Accel::Tcg,
            version: "7.2".into(),
            cmdline: KERNEL_CMDLINE.into(),
            tsc_khz: None,
        };
        let a = q.args(&spec(), &[3, 4, 5]);
        let mut other = spec();
        other.name = "def".into();
        other.image_disk = "/other.ext4".into();
        other.upper_disk = "/other.qcow2".into();
        let b = q.args(&other, &[7, 8, 9]);
        let devices = |args: &[String]| -> Vec<String> {
            args.windows(2)
                .filter(|w| w[0] == "-device")
                .map(|w| w[1].clone())
                .collect()
        };
        assert_eq!(devices(&a), devices(&b));
        assert!(a.contains(&"vessel-abc".to_string()));
        assert!(a.join(" ").contains("-m 256M -smp 2"));
        assert!(a
            .join(" ")
            .contains("-accel tcg,tb-size=32,split-wx=on -cpu max"));
        assert!(a
            .join(" ")
            .contains("-gdb unix:/run/x/gdb.sock,server=on,wait=off"));
        let kvm = Qemu {
            accel: Accel::Kvm,
            ..q.clone()
        };
        let k = kvm.args(&spec(), &[3, 4, 5]).join(" ");
        assert!(k.contains("-accel kvm -cpu host"), "{k}");
        assert!(
            !k.contains("-gdb"),
            "no translated code to flush under KVM: {k}"
        );
        // A clone has the same devices as a cold boot and as its template.
        let mut clone = spec();
        clone.boot = Boot::Clone {
            memory: "/t/mem".into(),
            state: "/t/state".into(),
        };
        let c = q.args(&clone, &[3, 4, 5]);
        assert_eq!(devices(&a), devices(&c));
        assert!(c.join(" ").contains("mem-path=/t/mem,share=off"));
        assert!(c.join(" ").contains("-incoming defer"));
        assert!(
            !c.contains(&"-kernel".to_string()),
            "a clone must not load the kernel again"
        );
        let mut tpl = spec();
        tpl.boot = Boot::Template {
            memory: "/t/mem".into(),
        };
        let t = q.args(&tpl, &[3, 4, 5]);
        assert!(t.join(" ").contains("mem-path=/t/mem,share=on"));
        assert_eq!(devices(&t), devices(&c));
    }
}
