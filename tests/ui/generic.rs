use dispatcher::{task, TaskError};

#[task]
async fn echo<T: serde::de::DeserializeOwned>(input: T) -> Result<String, TaskError> {
    Ok(String::new())
}

fn main() {}
