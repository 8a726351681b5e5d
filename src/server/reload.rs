//! The live configuration and its reload, without a restart.
//!
//! [`Gateway`] holds what every request reads first: the shared state (`AppState`), the CORS
//! answers and the connection limits, swapped whole ([`arc_swap`]) by a reload. A request
//! takes the state once and finishes on it, whatever reloads happen meanwhile.
//!
//! A reload (SIGHUP, `POST /admin/reload`, or the file watch) reads the whole configuration
//! again (the `--config` file, or the embedded default, then the environment), checks it as
//! `serve` would (validation, route templates, the TLS files), and only then swaps it in:
//! - upstreams whose settings did not change keep their pipeline: breaker state, pools,
//!   instances and statistics; changed ones get a new pipeline (calls in flight finish on
//!   the old one) that keeps the breaker state and the instances' ejections unless the
//!   upstream's addresses (`url` / `urls`) changed: an open breaker stays open, with its
//!   `Retry-After`, through a reload that only changed a timeout;
//! - the limiter, the token verifier and the response cache are kept when their sections did
//!   not change; the cache drops the entries of routes that are gone;
//! - a new TLS certificate is served to new handshakes; open connections keep theirs;
//! - settings read once at start (listener addresses, TLS on or off, the connection cap,
//!   `shutdown_grace`, `memory_trim_interval`, `watch_config`; worker threads come from the
//!   environment) are named in the answer and the log and not applied.
//!
//! An invalid configuration changes nothing: the errors are logged, counted and answered.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use super::conn::ConnSettings;
use super::tls::CertStore;
use crate::config::{redact, Config, ConfigErrors};
use crate::routes::AppState;

/// Where the configuration comes from.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    /// The `--config` file; `None`: the embedded default.
    pub file: Option<PathBuf>,
    /// Apply the environment overrides (`PORT`, `*_SERVICE_URL`, ...), as `serve` does.
    pub env: bool,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        let mut cfg = match &self.file {
            Some(path) => Config::from_file(path)?,
            None => Config::embedded(),
        };
        if self.env {
            cfg.apply_env(|k| std::env::var(k).ok())?;
        }
        Ok(cfg)
    }
}

/// What every request reads first; replaced whole by a reload.
pub(crate) struct Live {
    pub(crate) app: Arc<AppState>,
    /// The connection limits new connections get.
    pub(crate) conn: ConnSettings,
    /// `Strict-Transport-Security` for responses over TLS (`[server.tls.hsts]`).
    pub(crate) hsts: Option<http::HeaderValue>,
    /// When this configuration was loaded.
    loaded_at: SystemTime,
    /// The effective configuration's fingerprint (`config::redact::fingerprint`), the
    /// `gateway_config_info` label.
    sha256: String,
}

/// Why a reload changed nothing.
#[derive(Debug)]
pub enum ReloadError {
    /// The new configuration is invalid; the running one stays.
    Invalid(ConfigErrors),
    /// The new configuration is valid but could not be put in place (a backend could not be
    /// built); the running one stays.
    Failed(String),
}

/// What a reload did, as `POST /admin/reload` answers it.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    /// Always `"applied"`: a refused or failed reload is a [`ReloadError`], which
    /// `POST /admin/reload` answers with `"result": "rejected"` (400) or an error (500), so
    /// the field tells the answers apart.
    pub result: &'static str,
    /// The fingerprint of the configuration now running (`config::redact::fingerprint`), as
    /// `/admin/config` and `gateway_config_info` show it: replicas agree when it is equal.
    pub sha256: String,
    /// Top-level sections whose settings changed.
    pub changed: Vec<String>,
    /// Settings that changed but only take effect at the next start (not applied).
    pub needs_restart: Vec<String>,
    /// What the check found worth saying but not refusing (an expired certificate).
    pub warnings: Vec<String>,
}

/// What is applied to every configuration a reload loads, after the environment (the demo
/// points the upstreams at its simulators).
pub type Overrides = Box<dyn Fn(&mut Config) + Send + Sync>;

/// [`Overrides`] once set: shared with the configuration thread, which loads.
type SharedOverrides = Arc<dyn Fn(&mut Config) + Send + Sync>;

/// The running gateway's configuration and state.
pub struct Gateway {
    live: ArcSwap<Live>,
    /// Where a reload reads from; `None` (tests that start a `Config` directly):
    /// a reload can only be given its configuration (`apply`).
    source: Option<ConfigSource>,
    /// Applied to what `source` loads; set once (`override_reloads`).
    overrides: std::sync::OnceLock<SharedOverrides>,
    /// The certificate the TLS listener serves, when there is one.
    pub(crate) certs: Option<Arc<CertStore>>,
    /// The settings the listeners were started with: a reload cannot change them. Shared
    /// with the configuration thread (a clone per reload would be thousands of allocations).
    started: Arc<Config>,
    shutdown: watch::Receiver<bool>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

fn report_info(old: Option<&str>, new: &str) {
    if let Some(old) = old.filter(|o| *o != new) {
        metrics::gauge!("gateway_config_info", "sha256" => old.to_string()).set(0.0);
    }
    metrics::gauge!("gateway_config_info", "sha256" => new.to_string()).set(1.0);
}

/// The settings only a restart applies that differ between `started` and `next`.
fn restart_only(started: &Config, next: &Config) -> Vec<String> {
    let mut fields = Vec::new();
    let mut note = |field: &str, changed: bool| {
        if changed {
            fields.push(field.to_string());
        }
    };
    note("server.host", started.server.host != next.server.host);
    note("server.port", started.server.port != next.server.port);
    note(
        "server.tls (on/off)",
        started.server.tls.is_some() != next.server.tls.is_some(),
    );
    note(
        "server.tls.min_version",
        started.server.tls.as_ref().map(|t| &t.min_version)
            != next.server.tls.as_ref().map(|t| &t.min_version)
            && started.server.tls.is_some()
            && next.server.tls.is_some(),
    );
    note(
        "server.redirect_http",
        started.server.redirect_http != next.server.redirect_http,
    );
    note(
        "server.shutdown_grace",
        started.server.shutdown_grace != next.server.shutdown_grace,
    );
    note(
        "server.memory_trim_interval",
        started.server.memory_trim_interval != next.server.memory_trim_interval,
    );
    note(
        "server.watch_config",
        started.server.watch_config != next.server.watch_config,
    );
    note("admin.host", started.admin.host != next.admin.host);
    note("admin.port", started.admin.port != next.admin.port);
    note(
        "admin.max_connections",
        started.admin.max_connections != next.admin.max_connections,
    );
    note(
        "admin.fingerprint_key",
        started.admin.fingerprint_key != next.admin.fingerprint_key,
    );
    note(
        "limits.max_connections",
        started.limits.max_connections != next.limits.max_connections,
    );
    fields
}

/// `next` with the restart-only settings put back to what is running, so the state built
/// from it says what is in effect.
fn keep_running(started: &Config, mut next: Config) -> Config {
    next.server.host = started.server.host;
    next.server.port = started.server.port;
    if started.server.tls.is_none() || next.server.tls.is_none() {
        next.server.tls = started.server.tls.clone();
    } else if let (Some(s), Some(n)) = (&started.server.tls, next.server.tls.as_mut()) {
        n.min_version = s.min_version.clone();
    }
    next.server.redirect_http = started.server.redirect_http.clone();
    next.server.shutdown_grace = started.server.shutdown_grace;
    next.server.memory_trim_interval = started.server.memory_trim_interval;
    next.server.watch_config = started.server.watch_config;
    next.admin = started.admin.clone();
    next.limits.max_connections = started.limits.max_connections;
    next
}

/// The top-level sections whose settings differ.
fn changed_sections(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Runs `job` on the process's configuration thread (started on first use) and returns
/// its result; `Err` when the job panicked or the thread could not be started.
///
/// Why a thread of its own rather than the blocking pool: glibc's malloc gives each thread
/// an arena and keeps what is freed in it. A reload allocates tens of thousands of small
/// blocks (the TOML, the checks, the OpenAPI document) and frees most of them at once, with
/// the new state's long-lived blocks placed among them. On a pool thread, which also resolves
/// upstream names and comes and goes, that litter landed in arenas other work then
/// reused, and resident memory rose with each reload under traffic for the first ~15 minutes
/// (README "Soak"). One thread that does nothing else reuses its own arena reload after
/// reload: the cost is paid once.
async fn on_config_thread<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    type Job = Box<dyn FnOnce() + Send>;
    static THREAD: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let sender = THREAD.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("config-reload".into())
            .spawn(move || {
                for job in rx {
                    // A panicking job loses its own answer (its sender is dropped), not
                    // the thread.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the configuration thread");
                None
            }
        }
    });
    let Some(sender) = sender else {
        return Err("the configuration thread could not be started".into());
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    sender
        .send(Box::new(move || {
            let _ = tx.send(job());
        }))
        .map_err(|_| "the configuration thread is gone".to_string())?;
    rx.await
        .map_err(|_| "the reload panicked (see the log)".to_string())
}

/// A checked and built configuration, ready to swap in.
struct Prepared {
    live: Live,
    cert: Option<super::tls::LoadedCert>,
    changed: Vec<String>,
    needs_restart: Vec<String>,
    warnings: Vec<String>,
}

/// Checks `next` as `serve` would, keeps the restart-only settings, loads the certificate and
/// builds the state (reusing what did not change in `current`).
fn prepare(
    runtime: &tokio::runtime::Handle,
    started: &Config,
    current: &Live,
    mut next: Config,
    shutdown: watch::Receiver<bool>,
    tls_on: bool,
) -> Result<Prepared, ReloadError> {
    let warnings = super::check_with_warnings(&next).map_err(ReloadError::Invalid)?;
    // The same caps derived from the open-file limit as at start, before comparing: `started`
    // holds the derived caps, and a default compared with them looked like a changed setting
    // that needs a restart (a warning at every reload).
    super::fds::fit_defaults(&mut next);
    let needs_restart = restart_only(started, &next);
    let next = keep_running(started, next);
    let cert = match (tls_on, &next.server.tls) {
        (true, Some(tls)) => Some(
            super::tls::load(tls).map_err(|errors| ReloadError::Invalid(ConfigErrors(errors)))?,
        ),
        _ => None,
    };
    let changed = changed_sections(&current.app.config, &next);
    let app = runtime
        .block_on(super::build_state(next, shutdown, Some(&current.app)))
        .map_err(ReloadError::Failed)?;
    let live = Live::of(app);
    Ok(Prepared {
        live,
        cert,
        changed,
        needs_restart,
        warnings,
    })
}

impl Live {
    /// What requests read for `app`, loaded now.
    fn of(app: Arc<AppState>) -> Live {
        Live {
            conn: ConnSettings::from_config(&app.config),
            hsts: app
                .config
                .server
                .tls
                .as_ref()
                .and_then(|t| t.hsts.as_ref())
                .and_then(|h| http::HeaderValue::from_str(&h.header_value()).ok()),
            loaded_at: SystemTime::now(),
            sha256: redact::fingerprint(&app.config),
            app,
        }
    }
}

impl Gateway {
    pub(crate) fn new(
        app: Arc<AppState>,
        source: Option<ConfigSource>,
        certs: Option<Arc<CertStore>>,
        shutdown: watch::Receiver<bool>,
    ) -> Gateway {
        let live = Live::of(app);
        report_info(None, &live.sha256);
        Gateway {
            started: Arc::new(live.app.config.clone()),
            live: ArcSwap::from_pointee(live),
            source,
            overrides: std::sync::OnceLock::new(),
            certs,
            shutdown,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// The state requests use now.
    pub fn current(&self) -> Arc<AppState> {
        self.live.load().app.clone()
    }

    /// What a new request or connection reads: held for its whole life.
    pub(crate) fn live_full(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Reloads from the configuration's source.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let Some(source) = self.source.clone() else {
            return Err(ReloadError::Failed(
                "this gateway was started without a configuration source (demo): nothing to reload from".into(),
            ));
        };
        let overrides = self.overrides.get().cloned();
        self.apply_loaded(move || {
            let mut cfg = source.load()?;
            if let Some(apply) = overrides {
                apply(&mut cfg);
            }
            Ok(cfg)
        })
        .await
    }

    /// From now on, every configuration a reload loads goes through `apply` (after the
    /// environment) before it is checked. Only the first call counts.
    pub fn override_reloads(&self, apply: Overrides) {
        let _ = self.overrides.set(Arc::from(apply));
    }

    fn rejected(&self, errors: ConfigErrors) -> ReloadError {
        metrics::counter!("gateway_config_reloads_total", "result" => "invalid").increment(1);
        for e in &errors.0 {
            tracing::error!(field = %e.path, error = %e.message, "configuration reload rejected; the running configuration stays");
        }
        ReloadError::Invalid(errors)
    }

    /// Checks `next` and, if it is valid, puts it in place (see the module docs).
    pub async fn apply(&self, next: Config) -> Result<ReloadReport, ReloadError> {
        self.apply_loaded(move || Ok(next)).await
    }

    /// [`Gateway::apply`] to what `load` returns, loaded on the configuration thread.
    async fn apply_loaded(
        &self,
        load: impl FnOnce() -> Result<Config, ConfigErrors> + Send + 'static,
    ) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.live.load_full();
        // Reading, checking and building the new state is a few milliseconds of CPU
        // (parsing, templates, the OpenAPI document, hashing) and tens of thousands of
        // short-lived allocations: done on the configuration thread (see
        // `on_config_thread`), so the workers keep serving requests meanwhile (it showed in
        // their p99) and their heap does not take the reload's litter.
        let handle = tokio::runtime::Handle::current();
        let (started, shutdown, tls_on) = (
            self.started.clone(),
            self.shutdown.clone(),
            self.certs.is_some(),
        );
        let previous = current.clone();
        let prepared = on_config_thread(move || {
            let next = load().map_err(ReloadError::Invalid)?;
            prepare(&handle, &started, &previous, next, shutdown, tls_on)
        })
        .await
        .map_err(|e| ReloadError::Failed(format!("reload task failed: {e}")))?;
        let Prepared {
            live,
            cert,
            changed,
            needs_restart,
            warnings,
        } = match prepared {
            Ok(p) => p,
            Err(ReloadError::Invalid(errors)) => return Err(self.rejected(errors)),
            Err(ReloadError::Failed(e)) => {
                metrics::counter!("gateway_config_reloads_total", "result" => "failed")
                    .increment(1);
                tracing::error!(error = %e, "configuration reload failed; the running configuration stays");
                return Err(ReloadError::Failed(e));
            }
        };
        if let (Some(store), Some(cert)) = (&self.certs, &cert) {
            if store.serial() != cert.serial {
                tracing::info!(serial = %cert.serial, "TLS certificate replaced for new handshakes");
            }
            store.replace(cert);
        }
        // Entries of routes that are gone would only take room until they expire.
        for route in current.app.table.routes() {
            if !live
                .app
                .table
                .routes()
                .iter()
                .any(|r| r.label == route.label)
            {
                live.app.cache.purge_route(&route.label).await;
            }
        }
        let sha256 = live.sha256.clone();
        report_info(Some(&current.sha256), &sha256);
        self.live.store(Arc::new(live));
        metrics::counter!("gateway_config_reloads_total", "result" => "success").increment(1);
        tracing::info!(sha256 = %sha256, changed = ?changed, needs_restart = ?needs_restart,
            "configuration reloaded");
        for field in &needs_restart {
            tracing::warn!(field = %field, "changed in the configuration but only applied at the next start");
        }
        Ok(ReloadReport {
            result: "applied",
            sha256,
            changed,
            needs_restart,
            warnings,
        })
    }

    /// `/admin/config`: the effective configuration (secrets redacted), when and from where
    /// it was loaded, its hash, and the certificate served.
    pub fn describe(&self) -> serde_json::Value {
        let live = self.live.load();
        serde_json::json!({
            "loaded_at": humantime::format_rfc3339_seconds(live.loaded_at).to_string(),
            "sha256": live.sha256,
            "source": match &self.source {
                Some(ConfigSource { file: Some(p), .. }) => p.display().to_string(),
                Some(ConfigSource { file: None, .. }) => "embedded default".to_string(),
                None => "given at start (no reload source)".to_string(),
            },
            "tls_certificate_serial": self.certs.as_ref().map(|c| c.serial()),
            "config": redact::redacted_json(&live.app.config),
        })
    }

    /// The configuration file, when there is one (for the file watch).
    pub(crate) fn source_file(&self) -> Option<&PathBuf> {
        self.source.as_ref()?.file.as_ref()
    }
}
