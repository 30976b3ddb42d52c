//! `#[stick_breaking_attention(...)]` (issue 4). Not implemented yet: the attribute is reserved.
