//! The handlers of Unix-socket requests, by family, each named after the client command
//! that sends the request: [`generate`] (`run`, `chat`), [`control`] (`warm`, `switch`,
//! `stop`, `pin`, `reload`, `shutdown`, `serve`'s listener), [`observe`] (`status`,
//! `events`, `metrics`). They decide nothing about instances: they go through admission
//! or send the instance's worker a message, and relay what comes back.

pub(crate) mod control;
pub(crate) mod generate;
pub(crate) mod observe;
