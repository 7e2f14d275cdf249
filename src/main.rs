//! The `llmctl` binary: run the command, report its error, exit with its code.

fn main() {
    let code = match llmctl::run(std::env::args_os()) {
        Ok(()) => llmctl::error::exit::OK,
        Err(error) => llmctl::report(&error),
    };
    std::process::exit(code);
}
