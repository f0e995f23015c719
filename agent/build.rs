include!("../userdata-gen/contract/commit.rs");
