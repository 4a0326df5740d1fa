use dispatcher::prelude::*;

#[derive(Debug)]
struct MyError;

#[task]
async fn shout(input: String) -> Result<String, MyError> {
    if input.is_empty() {
        return Err(MyError);
    }
    Ok(input.to_uppercase())
}

fn main() {}
