use std::time::Instant;

use super::*;

/// One module on one node. See the crate-level docs of [`crate::module`].
pub struct Module {
    params: ModuleParams,
    persisted: PersistedState,
}

impl Module {
    pub fn new(params: ModuleParams, persisted: PersistedState) -> Module {
        Module { params, persisted }
    }
    pub fn params(&self) -> &ModuleParams {
        &self.params
    }
    pub fn persisted(&self) -> &PersistedState {
        &self.persisted
    }
    /// An admin command; refused with no change when it cannot apply now.
    pub fn handle_admin(&mut self, _now: Instant, _cmd: AdminCommand) -> Result<(), CommandError> {
        todo!()
    }
    pub fn handle(&mut self, _now: Instant, _event: Event) {
        todo!()
    }
    /// Call when `now` reached [`Module::poll_timeout`].
    pub fn handle_timeout(&mut self, _now: Instant) {
        todo!()
    }
    pub fn poll_timeout(&self) -> Option<Instant> {
        todo!()
    }
    pub fn poll_action(&mut self) -> Option<Action> {
        todo!()
    }
    pub fn snapshot(&self) -> Snapshot {
        todo!()
    }
}
