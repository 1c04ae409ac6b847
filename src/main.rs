fn main() {
    println!("kermail: being written");
}
