use dispatcher::{task, TaskError};

#[task(name = "other")]
async fn named(input: String) -> Result<String, TaskError> {
    Ok(input)
}

fn main() {}
