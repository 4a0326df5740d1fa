use dispatcher::{task, TaskError};

#[task]
fn shout(input: String) -> Result<String, TaskError> {
    Ok(input.to_uppercase())
}

fn main() -> std::process::ExitCode {
    dispatcher::run_tasks(&[&shout])
}
