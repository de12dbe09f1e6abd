//! tai-jidoka: layer 3, `processor_sup`.
//!
//! Owns `engine_sup`, the dynamic supervisor of the per tenant × SKU policy
//! engines (`engine:{tenant}:{sku}`), and `engine_router`, which starts,
//! feeds and passivates them. The engine's state machine is a pure function
//! (`machine`), its policies pure functions (`policy`). Depends on tai-core,
//! tai-otp and tai-store only.

pub mod breaker;
mod engine;
pub mod executor;
mod gates;
pub mod machine;
pub mod policy;
mod router;
mod states;
mod wakes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tai_core::config::{Config, SkuConfig};
use tai_core::msg::ENGINE_ROUTER;
use tai_core::names::ENGINE_SUP;
use tai_otp::{ChildSpec, Strategy, SupervisorSpec};
use tai_store::Store;

pub use engine::{Engine, EngineMsg};
pub use executor::{BreakerInfo, Breakers, Executors};
pub use router::{Router, RouterArgs};
pub use states::{engine_state, state_counts};

use machine::Sku;
pub use policy::rego::{RegoSet, ReloadReport};
use policy::Policy;

/// How `tai store check` reads what the engines store, as they read it:
/// their checkpoints (`e/`) and customers' payment windows (`v/`).
pub fn store_readers() -> tai_store::check::Readers<'static> {
    tai_store::check::Readers {
        checkpoint: &|b| {
            machine::Data::from_checkpoint(b)
                .map(drop)
                .map_err(|e| e.to_string())
        },
        velocity: &|b| {
            machine::payment_window(b)
                .map(drop)
                .map_err(|e| e.to_string())
        },
        breaker: &|b| {
            serde_json::from_slice::<breaker::Breaker>(b)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    }
}

/// A SKU's runtime rules from its config; its Rego files come from `rego`.
pub fn sku_from_config(c: &SkuConfig, rego: &RegoSet) -> Result<Sku, String> {
    let mut policies = c
        .policies
        .iter()
        .map(|p| Policy::from_config(p, c.params.get(p)))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, file) in c.rego.iter().enumerate() {
        policies.push(Policy::Rego(
            rego.load(file).map_err(|e| format!("rego[{i}]: {e}"))?,
        ));
    }
    Ok(Sku {
        quota: c.quota,
        period_ms: c.quota_period_secs.saturating_mul(1000),
        entitlement_timeout_ms: c.entitlement_timeout_secs.saturating_mul(1000),
        policies,
        executor: c.executor.clone(),
        configured: true,
    })
}

/// Every configured SKU's runtime rules; the first that fails is named
/// (`skus.{name}.…`). `tai serve` calls it before it opens the store, so a
/// policy that does not load (a Rego file missing or broken) is refused
/// before the data dir is touched.
pub fn skus_from_config(
    config: &Config,
    rego: &RegoSet,
) -> Result<HashMap<String, Arc<Sku>>, String> {
    config
        .skus
        .iter()
        .map(|(name, c)| {
            let sku = sku_from_config(c, rego).map_err(|e| format!("skus.{name}.{e}"))?;
            Ok((name.clone(), Arc::new(sku)))
        })
        .collect()
}

/// `processor_sup` (`rest_for_one`): `engine_sup` first, then the router that
/// starts engines under it: if `engine_sup` dies, the router restarts too.
pub fn supervisor_spec(
    store: Store,
    config: &Config,
    executors: Executors,
    rego: &RegoSet,
) -> Result<SupervisorSpec, String> {
    let skus = Arc::new(skus_from_config(config, rego)?);
    let unknown_sku = Arc::new(Sku {
        configured: false,
        ..sku_from_config(&SkuConfig::default(), rego)?
    });
    let idle_timeout = Duration::from_secs(config.jidoka.idle_timeout_secs.max(1));
    let max_active = config.jidoka.max_active_engines;
    Ok(SupervisorSpec::new(Strategy::RestForOne)
        .intensity(5, Duration::from_secs(10))
        .child(ChildSpec::supervisor(
            ENGINE_SUP,
            engine_sup_spec(max_active, config.kanban.wip_limit),
        ))
        .child(ChildSpec::worker(
            ENGINE_ROUTER,
            Some(ENGINE_ROUTER.to_string()),
            Router,
            move || RouterArgs {
                store: store.clone(),
                skus: skus.clone(),
                unknown_sku: unknown_sku.clone(),
                idle_timeout,
                max_active,
                executors: executors.clone(),
            },
        )))
}

/// `engine_sup`: one transient child per tenant × SKU, started on demand.
/// A crashed engine restarts alone; a passivated one (a normal stop) is removed.
/// The cap has headroom over `max_active_engines` for engines still draining.
/// Its intensity: [`ENGINE_RESTARTS`] in 10 s, see [`engine_sup_intensity`].
pub fn engine_sup_spec(max_active_engines: usize, wip_limit: u32) -> SupervisorSpec {
    SupervisorSpec::new(Strategy::SimpleOneForOne)
        .intensity(engine_sup_intensity(wip_limit), Duration::from_secs(10))
        .max_children(engine_sup_max_children(max_active_engines))
}

/// The engines' own restarts `engine_sup` allows in 10 s.
pub const ENGINE_RESTARTS: u32 = 100;

/// `engine_sup`'s restarts in 10 s: the engines' own [`ENGINE_RESTARTS`],
/// plus what the ledger's restarts cost it. An engine whose commit the
/// ledger took down with it crashes and comes back from its checkpoint;
/// each restart of `andon_ledger` cuts off up to `wip_limit` of them (one
/// signal in flight each), and `andon_sup` allows
/// [`ANDON_SUP_RESTARTS`](tai_core::names::ANDON_SUP_RESTARTS) in the same
/// 10 s. So a failing ledger escalates in its own layer, not here (at a
/// fixed 100, two ledger restarts close together took `engine_sup` down,
/// and every engine with it: soak seed 165).
pub fn engine_sup_intensity(wip_limit: u32) -> u32 {
    ENGINE_RESTARTS.saturating_add(tai_core::names::ANDON_SUP_RESTARTS.saturating_mul(wip_limit))
}

/// How many engines `engine_sup` runs at most, live and draining.
pub(crate) fn engine_sup_max_children(max_active_engines: usize) -> usize {
    max_active_engines.saturating_mul(2).max(16)
}
