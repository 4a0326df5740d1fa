use dispatcher::prelude::*;

#[task]
async fn shout(input: &String) -> Result<String, TaskError> {
    Ok(input.to_uppercase())
}

fn main() {}
