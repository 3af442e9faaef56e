//! The `haven-node` binary; everything lives in [`haven_node::cli`].

fn main() -> std::process::ExitCode {
    haven_node::cli::main()
}
