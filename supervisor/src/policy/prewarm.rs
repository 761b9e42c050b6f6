//! Which models to copy into the hot tier during a prewarm window, in order.

use std::cmp::Ordering;

use super::demand::Demand;
use super::view::ModelView;

/// The models to promote, in order: only those in the spec's prewarm list (pins always count
/// as listed), not already hot; pins first (higher priority first), then by observed demand at
/// local `hour`, then priority, then the list's order. Stops at the first model that would not
/// fit in what is left of the hot budget, so a big model wanted first is not overtaken by small
/// ones that would then leave it no room.
pub fn prewarm_order(
    models: &[ModelView],
    configured: &[String],
    demand: &Demand,
    hour: u8,
    hot_budget_bytes: u64,
    hot_used_bytes: u64,
) -> Vec<String> {
    let listed_at = |id: &str| configured.iter().position(|c| c == id).unwrap_or(usize::MAX);
    let mut wanted: Vec<&ModelView> =
        models.iter().filter(|m| !m.hot && (m.pinned || listed_at(&m.id) != usize::MAX)).collect();
    wanted.sort_by(|a, b| {
        b.pinned
            .cmp(&a.pinned)
            .then_with(|| if a.pinned { b.priority.cmp(&a.priority) } else { Ordering::Equal })
            .then_with(|| demand.score(&b.id, hour).partial_cmp(&demand.score(&a.id, hour)).unwrap_or(Ordering::Equal))
            .then_with(|| b.priority.cmp(&a.priority))
            .then_with(|| listed_at(&a.id).cmp(&listed_at(&b.id)))
            .then_with(|| a.id.cmp(&b.id))
    });
    let mut used = hot_used_bytes;
    let mut order = Vec::new();
    for m in wanted {
        match used.checked_add(m.size_bytes) {
            Some(after) if after <= hot_budget_bytes => {
                used = after;
                order.push(m.id.clone());
            }
            _ => break,
        }
    }
    order
}
