//! The web page at `/`: plain HTML with a little script over the same API, no build step.

/// The page.
pub const PAGE: &str = include_str!("page.html");
