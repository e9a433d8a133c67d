// The U-Net: placeholder until it lands.
