use dispatcher::{task, TaskError};

#[task]
async fn nothing() -> Result<String, TaskError> {
    Ok(String::new())
}

fn main() {}
