use dispatcher::task;

#[task]
async fn silent(input: String) {
    let _ = input;
}

fn main() {}
