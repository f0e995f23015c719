include!("contract/commit.rs");
