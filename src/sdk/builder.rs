//! (being written)
pub struct Service;
pub struct CommandBuilder;
