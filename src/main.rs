fn main() {
    std::process::exit(hamirror::cli::main());
}
