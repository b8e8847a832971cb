//! The app's controllers.

pub mod orders;
