use std::path::PathBuf; pub fn run(_b: PathBuf, _k: bool) -> anyhow::Result<()> { Ok(()) }
